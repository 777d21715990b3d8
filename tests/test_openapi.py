"""The OpenAPI document script/serve hands to coglet is the one `cog build` writes (pkg/schema/openapi_spec.go):
the operations, the request and response shapes, and every reference resolvable. (That coglet serves it and
validates with it is tested through the real server in test_deploy.py.) And what setup makes of it for coglet.
"""

from __future__ import annotations

import copy

import cog
import pytest

from script.openapi_schema import build_schema
from serving.openapi import served_schema


@pytest.fixture(scope="module")
def schema() -> dict:
    return build_schema()


def refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_the_operations_are_cogs(schema):
    operations = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert operations == {
        ("/", "get"),
        ("/health-check", "get"),
        ("/predictions", "post"),
        ("/predictions/{prediction_id}/cancel", "post"),
    }
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert schema["paths"]["/predictions"]["post"]["operationId"] == "predict_predictions_post"
    assert schema["openapi"] == "3.0.2" and schema["info"] == {"title": "Cog", "version": cog.__version__}


def test_predictions_post_takes_a_request_and_answers_a_response_or_422(schema):
    op = schema["paths"]["/predictions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictionRequest"
    }
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictionResponse"
    }
    assert op["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HTTPValidationError"
    }
    cancel = schema["paths"]["/predictions/{prediction_id}/cancel"]["post"]
    assert cancel["parameters"][0]["name"] == "prediction_id" and cancel["parameters"][0]["in"] == "path"


def test_the_components(schema):
    components = schema["components"]["schemas"]
    request, response = components["PredictionRequest"]["properties"], components["PredictionResponse"]["properties"]
    assert request["input"] == {"$ref": "#/components/schemas/Input"}
    assert set(request) == {"id", "input"}
    assert response["input"] == {"$ref": "#/components/schemas/Input"}
    assert response["output"] == {"$ref": "#/components/schemas/Output"}
    assert {"id", "status", "error", "logs", "metrics", "created_at", "started_at", "completed_at"} <= set(response)
    assert components["Status"]["enum"] == ["starting", "processing", "succeeded", "canceled", "failed"]
    assert components["ValidationError"]["required"] == ["loc", "msg", "type"]
    assert components["Output"] == {"title": "Output", "type": "string", "format": "uri"}
    assert components["Input"]["required"] == ["prompt", "input_image"]


def test_every_reference_resolves_and_stands_alone(schema):
    components = schema["components"]["schemas"]
    for ref in refs(schema):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components, ref

    def check(node):  # OpenAPI 3.0 allows no sibling keywords next to $ref
        if isinstance(node, dict):
            assert "$ref" not in node or set(node) == {"$ref"}, node
            for value in node.values():
                check(value)
        elif isinstance(node, list):
            for value in node:
                check(value)

    check(schema)


def test_choices_are_enumerations_and_optional_inputs_nullable(schema):
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert props["aspect_ratio"]["allOf"] == [{"$ref": "#/components/schemas/aspect_ratio"}]
    assert "title" not in props["aspect_ratio"]  # as Cog's generator: the enumeration carries it
    assert props["seed"]["nullable"] is True and props["seed"]["default"] is None
    assert [p["x-order"] for p in props.values()] == list(range(len(props)))


def test_the_served_document_is_openapi_3_1_with_null_in_each_nullable_type(schema):
    """What setup hands coglet (serving/openapi.py): the same inputs, each nullable one's type a list with "null"
    (OpenAPI 3.1, JSON Schema 2020-12: what coglet's validator reads), list bounds on the items; again changes
    nothing."""
    served = served_schema(copy.deepcopy(schema))
    assert served["openapi"] == "3.1.0"
    cog, props = schema["components"]["schemas"]["Input"]["properties"], served["components"]["schemas"]["Input"]
    props = props["properties"]
    assert list(props) == list(cog)
    for name, prop in cog.items():
        if not prop.get("nullable"):
            assert props[name] == prop, name
            continue
        assert props[name]["type"] == [prop["type"], "null"], name
        rest = {k: v for k, v in props[name].items() if k not in ("type", "items")}
        moved = ("minimum", "maximum") if prop["type"] == "array" else ()  # onto the items
        assert rest == {k: v for k, v in prop.items() if k not in ("type", "items", *moved)}, name
    assert props["seed"]["minimum"] == -1 and props["lora_strength"]["items"]["maximum"] == 3
    assert served_schema(copy.deepcopy(served)) == served

    def check(node: dict):  # every schema's `type` a JSON Schema type, or a list of distinct ones
        kind = node.get("type", "object")
        kinds = kind if isinstance(kind, list) and len(set(kind)) == len(kind) else [kind]
        assert set(kinds) <= {"array", "boolean", "integer", "null", "number", "object", "string"}, node
        for sub in [*node.get("properties", {}).values(), *node.get("anyOf", ()), *node.get("allOf", ())]:
            check(sub)
        if "items" in node:
            check(node["items"])

    for component in served["components"]["schemas"].values():
        check(component)
