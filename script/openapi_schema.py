"""Print the OpenAPI schema of the predictor, as `cog build` writes it to .cog/openapi_schema.json.

The Cog server (coglet) validates requests against that file only: without it a missing or out-of-range
input would reach the predictor unchecked. It also serves the file at /openapi.json, where client
generators and API fuzzers read the operations, so this is the complete document, not just the inputs.

The shape follows Cog's own generator (replicate/cog, pkg/schema/openapi_spec.go): OpenAPI 3.0.2; the paths
/, /health-check, POST /predictions and POST /predictions/{prediction_id}/cancel; the components Input (from
the inputs predict.py declares), Output, one enumeration per input with choices, PredictionRequest,
PredictionResponse, Status, HTTPValidationError and ValidationError. Two additions, both things coglet
serves and older Cog schemas listed: PUT /predictions/{prediction_id} (idempotent creation) and POST
/shutdown, and the request's `webhook` and `webhook_events_filter` fields (asynchronous predictions).

    python script/openapi_schema.py [predict.py:Predictor]
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STATUSES = ["starting", "processing", "succeeded", "canceled", "failed"]
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]


def _number(x: float) -> int | float:
    return x if isinstance(x, int) else int(x) if float(x).is_integer() else x


def _title(name: str) -> str:
    # Cog's TitleCase: split on "_", capitalise each part's first letter.
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


def input_schemas(predictor_ref: str = "predict.py:Predictor") -> tuple[dict, dict[str, dict], dict]:
    """(Input, {enum name: enum schema}, Output) from the predictor's declared inputs and output."""
    from cog._adt import Repetition
    from cog._inspector import create_predictor

    module_file, class_name = predictor_ref.split(":")
    sys.path.insert(0, str(ROOT))
    info = create_predictor(Path(module_file).stem, class_name)
    # cog's inspector keeps ge/le as floats, which cannot hold every integer bound (the seed's
    # maximum 2**63 - 1 becomes 2**63): the bounds are taken as predict.py declares them.
    predictor = getattr(importlib.import_module(Path(module_file).stem), class_name)
    declared = inspect.signature(getattr(predictor, "run", None) or predictor.predict).parameters

    properties: dict[str, dict] = {}
    enums: dict[str, dict] = {}
    required = []
    for name, field in sorted(info.inputs.items(), key=lambda kv: kv[1].order):
        prop: dict = {"x-order": field.order}
        if field.choices is not None:
            enums[name] = {"title": name, "description": "An enumeration.", "enum": list(field.choices)}
            enums[name].update(field.type.json_type())
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(field.type.json_type())
        if field.default is not None:
            prop["default"] = field.default
        elif field.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED):
            # Optional with None as its default: omitted or null both mean "none given".
            prop["default"] = None
            prop["nullable"] = True
        else:
            required.append(name)
        if field.description:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(declared[name].default.ge)
        if field.le is not None:
            prop["maximum"] = _number(declared[name].default.le)
        properties[name] = prop

    input_schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    output = {**info.output.json_type(), "title": "Output"}
    return input_schema, enums, output


def _json_response(schema: dict, description: str = "Successful Response") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


VALIDATION_ERROR = _json_response(_ref("HTTPValidationError"), "Validation Error")


def _prediction_id_parameter() -> dict:
    return {
        "required": True,
        "schema": {"title": "Prediction Id", "type": "string"},
        "name": "prediction_id",
        "in": "path",
    }


def _prefer_header() -> dict:
    # "Prefer: respond-async" answers 202 at once and reports to the webhook.
    return {"required": False, "schema": {"title": "Prefer", "type": "string"}, "name": "prefer", "in": "header"}


def build_schema(predictor_ref: str = "predict.py:Predictor") -> dict:
    """The complete OpenAPI document for the predictor (see the module docstring)."""
    from cog import __version__ as cog_version

    input_schema, enums, output = input_schemas(predictor_ref)
    any_json = _json_response({})
    predict_responses = {"200": _json_response(_ref("PredictionResponse")), "422": VALIDATION_ERROR}
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": any_json}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": any_json},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "parameters": [_prefer_header()],
                "requestBody": {"content": {"application/json": {"schema": _ref("PredictionRequest")}}},
                "responses": predict_responses,
            }
        },
        "/predictions/{prediction_id}": {
            "put": {
                "summary": "Predict Idempotent",
                "description": "Run a single prediction on the model (idempotent creation).",
                "operationId": "predict_idempotent_predictions__prediction_id__put",
                "parameters": [_prediction_id_parameter(), _prefer_header()],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("PredictionRequest")}},
                },
                "responses": predict_responses,
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "description": "Cancel a running prediction",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [_prediction_id_parameter()],
                "responses": {"200": any_json, "422": VALIDATION_ERROR},
            }
        },
        "/shutdown": {
            "post": {
                "summary": "Start Shutdown",
                "operationId": "start_shutdown_shutdown_post",
                "responses": {"200": any_json},
            }
        },
    }
    date_time = {"type": "string", "format": "date-time"}
    schemas = {
        "Input": input_schema,
        "Output": output,
        **enums,
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": _ref("Input"),
                "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
                "webhook_events_filter": {
                    "title": "Webhook Events Filter",
                    "type": "array",
                    "items": _ref("WebhookEvent"),
                    "default": WEBHOOK_EVENTS,
                },
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": _ref("Input"),
                "output": _ref("Output"),
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **date_time},
                "started_at": {"title": "Started At", **date_time},
                "completed_at": {"title": "Completed At", **date_time},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {"title": "Status", "description": "An enumeration.", "enum": STATUSES, "type": "string"},
        "WebhookEvent": {
            "title": "WebhookEvent",
            "description": "An enumeration.",
            "enum": WEBHOOK_EVENTS,
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": _ref("ValidationError")}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog_version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


if __name__ == "__main__":
    print(json.dumps(build_schema(*sys.argv[1:2]), indent=2))
