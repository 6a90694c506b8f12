//! What the OpenAPI document says beyond what utoipa derives from the handlers: the ShapeBlock
//! kinds, from the same schemars schemas the CRDs are generated from (a client gets `App`,
//! `AppSpec`, `AppStatus`, … as types, with the field docs and validation rules the cluster
//! enforces, instead of "an object"), and the error responses every route shares.
//!
//! utoipa only names the kinds here (so paths can say `body = App`); [`insert`] puts the
//! schemars schemas in the serialized document's `components.schemas`.

use std::borrow::Cow;

use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde_json::{Map, Value, json};
use utoipa::openapi::{ObjectBuilder, RefOr, Schema};

use crate::crd::{App, AppBuild, Project, Service, Team};

/// A list of Apps, as the apiserver returns it.
#[derive(serde::Serialize)]
pub struct AppList;
/// A list of AppBuilds, as the apiserver returns it.
#[derive(serde::Serialize)]
pub struct AppBuildList;
/// A list of Projects, as the apiserver returns it.
#[derive(serde::Serialize)]
pub struct ProjectList;
/// A list of Services, as the apiserver returns it.
#[derive(serde::Serialize)]
pub struct ServiceList;
/// A list of Teams, as the apiserver returns it.
#[derive(serde::Serialize)]
pub struct TeamList;

/// A Kubernetes `Status`: what a delete returns once the object is gone.
#[derive(serde::Serialize)]
pub struct Status;

macro_rules! named {
    ($ty:ty, $name:expr) => {
        impl utoipa::PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                // Replaced by [`insert`] in the document served and committed.
                RefOr::T(Schema::Object(ObjectBuilder::new().build()))
            }
        }
        impl utoipa::ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

named!(App, "App");
named!(AppBuild, "AppBuild");
named!(Project, "Project");
named!(Service, "Service");
named!(AppList, "AppList");
named!(AppBuildList, "AppBuildList");
named!(ProjectList, "ProjectList");
named!(ServiceList, "ServiceList");
named!(Team, "Team");
named!(TeamList, "TeamList");
named!(Status, "Status");

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A kind's object schema: `apiVersion`, `kind`, `metadata`, and the spec and status types.
fn object<K: CustomResourceExt>(spec: &str, status: &str, generator: &mut Generator) -> Value {
    let crd = K::crd();
    let version = crd.spec.versions.first();
    let description = version
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.description.clone())
        .unwrap_or_default();
    let kind = crd.spec.names.kind;
    json!({
        "type": "object",
        "description": format!("{description}\n\n`status` is written by the hub: a request carrying it is refused (400)."),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": format!("`{}/{}`; may be left out in requests", crate::crd::GROUP, crate::crd::VERSION)},
            "kind": {"type": "string", "description": format!("`{kind}`; may be left out in requests")},
            "metadata": generator.object_meta(),
            "spec": reference(spec),
            "status": reference(status)
        }
    })
}

fn list(kind: &str, generator: &mut Generator) -> Value {
    json!({
        "type": "object",
        "description": format!("A list of {kind}s"),
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": generator.list_meta(),
            "items": {"type": "array", "items": reference(kind)}
        }
    })
}

struct Generator(schemars::SchemaGenerator);

impl Generator {
    fn new() -> Self {
        let settings = schemars::generate::SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        });
        Self(settings.into_generator())
    }

    fn add<T: JsonSchema>(&mut self) -> Value {
        self.0.subschema_for::<T>().to_value()
    }

    /// A reference to `T`'s schema, among the definitions even when schemars would inline it
    /// (the kinds' specs, whose CEL rules make them inline).
    fn named<T: JsonSchema>(&mut self) -> (String, Value) {
        let schema = self.add::<T>();
        let name = T::schema_name().into_owned();
        if schema.get("$ref").is_none() {
            self.0.definitions_mut().insert(name.clone(), schema);
        }
        let reference = reference(&name);
        (name, reference)
    }

    fn object_meta(&mut self) -> Value {
        self.add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>()
    }

    fn list_meta(&mut self) -> Value {
        self.add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>()
    }
}

/// Rewrites each `oneOf` of string constants (schemars' shape for an enum whose variants have
/// docs) as a plain `enum`, the docs listed in its description: what OpenAPI clients turn into
/// an enum type (openapi-python-client cannot parse the `oneOf` form inside an optional field).
fn plain_enums(schema: &mut Value) {
    match schema {
        Value::Array(items) => items.iter_mut().for_each(plain_enums),
        Value::Object(object) => {
            let constants: Option<Vec<(Value, Option<String>)>> = object
                .get("oneOf")
                .and_then(Value::as_array)
                .and_then(|variants| {
                    variants
                        .iter()
                        .map(|v| {
                            let constant = v.get("const").filter(|c| c.is_string())?;
                            let doc = v.get("description").and_then(Value::as_str);
                            Some((constant.clone(), doc.map(str::to_owned)))
                        })
                        .collect()
                });
            match constants {
                Some(constants) if !constants.is_empty() => {
                    object.remove("oneOf");
                    let mut doc = object
                        .get("description")
                        .and_then(Value::as_str)
                        .map(|d| format!("{d}\n"))
                        .unwrap_or_default();
                    for (constant, variant_doc) in &constants {
                        let name = constant.as_str().unwrap_or_default();
                        match variant_doc {
                            Some(d) => doc.push_str(&format!("\n- `{name}`: {d}")),
                            None => doc.push_str(&format!("\n- `{name}`")),
                        }
                    }
                    object.insert("type".into(), json!("string"));
                    object.insert(
                        "enum".into(),
                        Value::Array(constants.into_iter().map(|(c, _)| c).collect()),
                    );
                    object.insert("description".into(), Value::String(doc.trim().to_string()));
                }
                _ => object.values_mut().for_each(plain_enums),
            }
        }
        _ => {}
    }
}

/// Puts the ShapeBlock kinds' schemas, and the Kubernetes types they use, in an OpenAPI
/// document's `components.schemas`.
pub fn insert(document: &mut Value) {
    let mut generator = Generator::new();
    let mut schemas = Map::new();
    macro_rules! kind {
        ($kind:ty, $name:literal, $spec:ty, $status:ty) => {
            let (spec, _) = generator.named::<$spec>();
            let (status, _) = generator.named::<$status>();
            let object = object::<$kind>(&spec, &status, &mut generator);
            schemas.insert($name.into(), object);
            schemas.insert(concat!($name, "List").into(), list($name, &mut generator));
        };
    }
    kind!(App, "App", crate::crd::AppSpec, crate::crd::AppStatus);
    kind!(
        AppBuild,
        "AppBuild",
        crate::crd::AppBuildSpec,
        crate::crd::AppBuildStatus
    );
    kind!(
        Project,
        "Project",
        crate::crd::ProjectSpec,
        crate::crd::ProjectStatus
    );
    kind!(
        Service,
        "Service",
        crate::crd::ServiceSpec,
        crate::crd::ServiceStatus
    );
    kind!(Team, "Team", crate::crd::TeamSpec, crate::crd::TeamStatus);
    let status = generator.add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>();
    schemas.insert("Status".into(), status);
    schemas.extend(generator.0.take_definitions(true));
    for schema in schemas.values_mut() {
        plain_enums(schema);
    }
    let Some(components) = document
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    components.extend(schemas);
}

/// What an error response means, by status, when the route says no more.
fn error_meaning(status: &str) -> &'static str {
    match status {
        "400" => {
            "the request is malformed: a name that is not a Kubernetes name, a bad query, a body the apiserver refuses"
        }
        "401" => "no API token, or one that is not valid",
        "403" => {
            "a viewer token asked for a change, or the agent's RBAC in the cluster refused the request"
        }
        "404" => "no such cluster, or no such object in it",
        "409" => "the object exists already, or a conflicting change won",
        "413" => "the body is larger than `max_request_body_bytes`",
        "415" => "the body is not `application/json`",
        "422" => "the body is JSON but not valid: the CRD schema or its rules refuse it",
        "500" => "the hub failed (a cluster store write, or the cluster's apiserver)",
        "502" => "the request through the tunnel failed in an unexpected way",
        "503" => {
            "the cluster's agent has no live tunnel to the hub (retry after `Retry-After` seconds)"
        }
        _ => "an error",
    }
}

/// Declares on every operation the errors that follow from where it is, with the body
/// ([`super::ApiError`]) they carry: 401 on every route (the token check), 403 on every change
/// (viewer tokens), and on the routes that go through a cluster's tunnel 403 (its RBAC), 500,
/// 502 and 503 (the tunnel); and describes every error response by its status.
pub fn declare_errors(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    for (path, item) in document.paths.paths.iter_mut() {
        let through_tunnel =
            path.contains("/projects") || path.contains("/teams") || path.contains("/namespaces/");
        let operations = [
            (&mut item.get, false),
            (&mut item.head, false),
            (&mut item.post, true),
            (&mut item.put, true),
            (&mut item.patch, true),
            (&mut item.delete, true),
        ];
        for (operation, changes) in operations {
            let Some(operation) = operation else {
                continue;
            };
            let mut statuses = vec!["401"];
            if changes || through_tunnel {
                statuses.push("403");
            }
            if through_tunnel {
                statuses.extend(["404", "500", "502", "503"]);
            }
            let responses = &mut operation.responses.responses;
            for status in statuses {
                responses.entry(status.to_string()).or_insert_with(|| {
                    ResponseBuilder::new()
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ApiError")))
                                .build(),
                        )
                        .into()
                });
            }
            for (status, response) in responses.iter_mut() {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                    && !status.starts_with('2')
                {
                    response.description = error_meaning(status).to_string();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_enum_variants_become_a_plain_enum() {
        let mut schema = json!({"properties": {"phase": {"description": "Where it is.",
            "oneOf": [{"type": "string", "const": "Pending", "description": "Waiting."},
                      {"type": "string", "const": "Ready"}]},
            "other": {"oneOf": [{"$ref": "#/components/schemas/A"}, {"type": "null"}]}}});
        plain_enums(&mut schema);
        assert_eq!(
            schema["properties"]["phase"],
            json!({"type": "string", "enum": ["Pending", "Ready"],
                "description": "Where it is.\n\n- `Pending`: Waiting.\n- `Ready`"})
        );
        assert!(
            schema["properties"]["other"]["oneOf"].is_array(),
            "other unions stay"
        );
    }

    #[test]
    fn every_kind_is_typed_from_its_schemars_schema() {
        let document = crate::hub::api::openapi().unwrap();
        let schemas = &document["components"]["schemas"];
        for kind in ["App", "AppBuild", "Project", "Service"] {
            let spec = &schemas[kind]["properties"]["spec"]["$ref"];
            assert_eq!(spec, &json!(format!("#/components/schemas/{kind}Spec")));
            assert!(
                schemas[format!("{kind}Spec")]["properties"].is_object(),
                "{kind}Spec"
            );
            assert!(
                schemas[format!("{kind}Status")]["properties"].is_object(),
                "{kind}Status"
            );
        }
        assert_eq!(schemas["AppBuildPhase"]["enum"][3], "Completed");
    }
}
