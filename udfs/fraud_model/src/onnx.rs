//! The parts of ONNX's protobuf schema (`onnx/onnx.proto`) this module reads: a model's graph,
//! its nodes and their attributes, and the model's metadata.
//!
//! Why our own messages rather than an ONNX crate's: reading a tree ensemble needs only these
//! few fields, and the crates that carry the whole schema come with a runtime (tract is ~150
//! crates and 8 CPU-minutes to build), which the demo's model never runs. Field numbers are
//! the schema's; fields not listed here are skipped by the decoder, so any valid ONNX file
//! decodes, whatever else it holds.

/// `ModelProto`: the file's top level.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    /// Free-form key/value pairs the exporter recorded (`riffle.features` among them).
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `StringStringEntryProto`: one metadata entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `GraphProto`: the computation, as nodes in topological order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// The graph's inputs (only their number is read).
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
}

/// `ValueInfoProto`: a named input or output (its type is not read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `NodeProto`: one operator application.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    /// The operator set the operator belongs to (`ai.onnx.ml` for tree ensembles).
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `AttributeProto`: one named attribute of a node (only the kinds tree ensembles use).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
}
