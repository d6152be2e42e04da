//! The OpenAPI 3.0 document served at `/api/v1/openapi.json`, built from [`super::ROUTES`] (the
//! same table the router checks every route against), with the request bodies' schemas.
//!
//! Invariant: every path and method in the document is a route and every route is in the
//! document (tests in `api::tests` send a request to each and check the router's table).

use serde_json::{json, Map, Value};

fn schemas() -> Value {
    json!({
        "Login": {
            "type": "object",
            "required": ["password"],
            "properties": {
                "user": {"type": "string", "default": "admin"},
                "password": {"type": "string", "format": "password"}
            }
        },
        "NewVolume": {
            "type": "object",
            "required": ["name", "size"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "size": {"oneOf": [{"type": "string", "example": "10GiB"}, {"type": "integer", "minimum": 1048576}]},
                "block_size": {"type": "integer", "enum": [512, 4096], "default": 512},
                "lun": {"type": "integer", "minimum": 0, "maximum": 255},
                "k": {"type": "integer", "minimum": 1},
                "m": {"type": "integer", "minimum": 0}
            }
        },
        "ResizeVolume": {
            "type": "object",
            "required": ["size"],
            "properties": {"size": {"type": "string"}}
        },
        "AddController": {
            "type": "object",
            "required": ["id", "peer"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "peer": {"type": "string", "description": "ip:port of its peer listener"}
            }
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "field": {"type": "string", "nullable": true}
            }
        }
    })
}

/// The document.
pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for d in super::ROUTES {
        let params: Vec<Value> = d
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": d.summary,
            "operationId": format!("{} {}", d.method, d.path),
            "responses": {
                "200": {"description": "OK"},
                "default": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(b) = d.body {
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}
            });
        }
        if d.auth {
            op["security"] = json!([{"cookie": []}, {"bearer": []}]);
        } else {
            op["security"] = json!([]);
        }
        let entry = paths
            .entry(d.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[d.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "rainio appliance API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Operator API of the distributed iSCSI target appliance. Every controller serves it and answers for the whole cluster."
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "cookie": {"type": "apiKey", "in": "cookie", "name": super::auth::COOKIE},
                "bearer": {"type": "http", "scheme": "bearer"}
            }
        }
    })
}
