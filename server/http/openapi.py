"""The OpenAPI 3.1 document served at /openapi.json, made from the route table and the
protobuf descriptors themselves: a field added to the .proto shows up here with no
second place to edit.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from server.http.routes import ID, JSON, RECORD, ROUTES, Route
from server.http.sse import EVENT_STREAM
from server.sessions.memory import SESSION_ID_PATTERN

F = FieldDescriptor
INTEGER_FORMATS = {F.TYPE_INT32: "int32", F.TYPE_SINT32: "int32", F.TYPE_SFIXED32: "int32",
                   F.TYPE_UINT32: "uint32", F.TYPE_FIXED32: "uint32", F.TYPE_INT64: "int64",
                   F.TYPE_SINT64: "int64", F.TYPE_SFIXED64: "int64", F.TYPE_UINT64: "uint64",
                   F.TYPE_FIXED64: "uint64"}
WIDE = {"int64", "uint64"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "the gRPC status name, e.g. INVALID_ARGUMENT"},
        "message": {"type": "string", "description": "the gRPC status message"},
    }}},
}


def field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.type == F.TYPE_MESSAGE:
        item: dict[str, Any] = {"$ref": f"#/components/schemas/{message_schema(field.message_type, schemas)}"}
    elif field.type == F.TYPE_ENUM:
        item = {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    elif field.type in INTEGER_FORMATS:
        fmt = INTEGER_FORMATS[field.type]
        # 64-bit values may come as strings (the proto JSON mapping; JavaScript numbers stop at 2**53).
        item = {"type": ["integer", "string"] if fmt in WIDE else "integer", "format": fmt}
    elif field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        item = {"type": "number", "format": "float" if field.type == F.TYPE_FLOAT else "double"}
    elif field.type == F.TYPE_BOOL:
        item = {"type": "boolean"}
    elif field.type == F.TYPE_BYTES:
        item = {"type": "string", "contentEncoding": "base64"}
    else:
        item = {"type": "string"}
    if field.is_repeated:
        return {"type": "array", "items": item}
    return item


def message_schema(descriptor: Descriptor, schemas: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """Adds the schema of `descriptor` (and of the messages it holds) to `schemas`; returns its name."""
    name = descriptor.name + ("Body" if skip else "")
    if name in schemas:
        return name
    schemas[name] = {}  # placeholder first: a message that holds itself must not recurse forever
    properties = {field.name: field_schema(field, schemas) for field in descriptor.fields if field.name not in skip}
    optional = [field.name for field in descriptor.fields if field.has_presence and field.type != F.TYPE_MESSAGE]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if optional:
        schema["description"] = "Unset (absent or null): " + ", ".join(optional) + " take their defaults."
    schemas[name] = schema
    return name


def operation(route: Route, schemas: dict[str, Any], keys: bool) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.rpc, "summary": route.summary,
                          "responses": {"default": {"description": "an error (the gRPC status as JSON)",
                                                    "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}}}
    if ID in route.path:
        op["parameters"] = [{"name": "session_id", "in": "path", "required": True,
                             "schema": {"type": "string", "pattern": f"^{SESSION_ID_PATTERN.pattern}$"}}]
    if route.body == JSON and route.request is not None:
        ref = message_schema(route.request.DESCRIPTOR, schemas, skip=("session_id",) if ID in route.path else ())
        body = {"$ref": f"#/components/schemas/{ref}"}
        if route.rpc == "Generate":
            body = {"allOf": [body], "properties": {"stream": {
                "type": "boolean", "description": "true: server-sent events (as Accept: text/event-stream)"}}}
        op["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    elif route.body == RECORD:
        op["requestBody"] = {"required": True, "content": {
            RECORD: {"schema": {"type": "string", "contentMediaType": RECORD}},
            JSON: {"schema": {"$ref": f"#/components/schemas/{message_schema(route_request(route), schemas)}"}}}}
    op["responses"]["200"] = {"description": "the RPC's response", "content": reply_content(route, schemas)}
    if keys:
        op["security"] = [{"bearer": []}]
    return op


def route_request(route: Route) -> Descriptor:
    from protos.charstream.v1 import generator_pb2 as pb

    return pb.DESCRIPTOR.message_types_by_name[f"{route.rpc}Request"]


def reply_content(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    if route.returns == RECORD:
        return {RECORD: {"schema": {"type": "string", "contentMediaType": RECORD}}}
    assert route.response is not None
    ref = {"$ref": f"#/components/schemas/{message_schema(route.response.DESCRIPTOR, schemas)}"}
    content: dict[str, Any] = {JSON: {"schema": ref}}
    if route.rpc == "Generate":
        content[EVENT_STREAM] = {"schema": {"type": "string", "description": (
            'one event per message: data: {"text": ...}; the last one carries every GenerateResponse field '
            "(finish_reason, generated_chars, prompt_chars, matched_stop); a failure after the first message "
            "is an event named error whose data is the Error object")}}
    return content


def openapi_document(version: str, keys: bool) -> dict[str, Any]:
    """The document; `keys`: the server takes API keys (every /v1 route then needs one)."""
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route, schemas, keys)
    health = {"get": {"summary": "SERVING (200) or not (503), as the gRPC health service says", "responses": {
        "200": {"description": "serving", "content": {JSON: {"schema": {"type": "object", "properties": {
            "status": {"type": "string"}}}}}}, "503": {"description": "not serving"}}}}
    paths["/healthz"] = health
    paths["/readyz"] = health
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "charstream HTTP API", "version": version,
                 "description": "The charstream.v1.Generator RPCs over HTTP/JSON; streams as server-sent events."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if keys:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
