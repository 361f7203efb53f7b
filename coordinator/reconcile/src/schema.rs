//! JSON Schemas for the fields whose Rust types have none of their own (`feature = "schema"`):
//! what the Kubernetes CRD declares for them. Structural, as apiextensions/v1 requires.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// An RFC 3339 time (`jiff::Timestamp`).
pub fn timestamp(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time"})
}

/// An optional RFC 3339 time.
pub fn optional_timestamp(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time", "nullable": true})
}

/// A metal3 value Slipway keeps as it is (`raid`, `firmware`, ...): any JSON, kept whole.
pub fn any_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"x-kubernetes-preserve-unknown-fields": true, "nullable": true})
}

/// An object Slipway owns whose shape is its own business (the command in flight).
pub fn any_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "nullable": true
    })
}

impl JsonSchema for crate::host::SharedList {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StringList".into()
    }

    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        Vec::<String>::json_schema(g)
    }
}
