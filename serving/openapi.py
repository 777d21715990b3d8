"""Make the schema the Cog server validates with and serves say what it accepts: `null` for the inputs it marks
nullable, the items of a list input checked against the bounds it gives, and no prediction request without an
`input`.

`cog build` marks an input declared `X | None` with OpenAPI 3.0's `"nullable": true` (replicate/cog
pkg/schema/openapi_spec.go), which means that `null` is a valid value. coglet validates requests with a JSON
Schema validator that does not know `nullable` (crates/coglet/src/input_validation.rs compiles the Input schema
with the `jsonschema` crate), so it answers `null` with 422 "null is not of type ...": a client that sends
`"seed": null` for "no seed" (what JavaScript and Python clients do for an unset value) is refused although the
schema it reads allows it.

coglet reads .cog/openapi_schema.json when setup has finished (crates/coglet/src/worker.rs: "Load the pre-built
schema" comes after the predictor's setup). So setup rewrites each nullable input to say the same thing in a form
that validator honours: the input's type and constraints move into the first branch of an `anyOf`, and a second
branch accepts `null` (`{"enum": [null], "nullable": true}`, valid OpenAPI 3.0 as well). Title, description,
default and order stay where they were. Nothing else about the inputs changes, and a rewritten input is left as
it is, so running this twice changes nothing. tests/test_deploy.py checks, through the real server, that every
input the schema marks nullable takes `null`, and that every other one refuses it with a 422 naming it.

A list input with `ge`/`le` (`list[float]`: lora_strength) gets them as the array's own `minimum`/`maximum`
(openapi_spec.go writes an input's bounds beside its type, whatever the type), where JSON Schema applies them
to numbers only: coglet lets any item through. Cog's Python SDK checks such bounds on every item
(cog/_inspector.py), which is what they mean; so setup moves them into `items`, where coglet checks each item and
answers one out of range with a 422 naming the input.

The other way round, Cog's PredictionRequest does not list `input` as required, but coglet answers a request
without one with 422 (the required inputs are missing): the served document says it is required (an API fuzzer
in positive mode found no other schema-valid request refused).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(".cog") / "openapi_schema.json"  # where coglet reads it, relative to the server's directory
NULL = {"enum": [None], "nullable": True}
_ANNOTATIONS = ("title", "description", "default", "nullable", "x-order", "deprecated")


def accept_null(schema: dict) -> dict:
    """`schema` (an OpenAPI document from `cog build`) with every nullable input accepting `null`."""
    properties = schema.get("components", {}).get("schemas", {}).get("Input", {}).get("properties", {})
    for name, prop in list(properties.items()):
        if prop.get("nullable") is not True or NULL in prop.get("anyOf", ()):
            continue
        typed = {k: v for k, v in prop.items() if k not in _ANNOTATIONS}
        properties[name] = {k: v for k, v in prop.items() if k in _ANNOTATIONS} | {"anyOf": [typed, NULL]}
    return schema


def bound_list_items(schema: dict) -> dict:
    """`schema` (an OpenAPI document from `cog build`) with the bounds of every list input on its items."""
    properties = schema.get("components", {}).get("schemas", {}).get("Input", {}).get("properties", {})
    for prop in properties.values():
        if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            for key in ("minimum", "maximum"):
                if key in prop:
                    prop["items"][key] = prop.pop(key)
    return schema


def require_input(schema: dict) -> dict:
    """`schema` with `input` required in a prediction request when some input is."""
    schemas = schema.get("components", {}).get("schemas", {})
    request = schemas.get("PredictionRequest", {})
    if schemas.get("Input", {}).get("required") and "input" in request.get("properties", {}):
        request["required"] = sorted({*request.get("required", ()), "input"})
    return schema


def served_schema(schema: dict) -> dict:
    """`schema` as coglet is given it: list items bounded, `null` accepted where it is nullable, `input`
    required."""
    return require_input(accept_null(bound_list_items(schema)))


def rewrite_schema_file(path: Path = SCHEMA_FILE) -> None:
    """Rewrite the schema file coglet is about to read (see the module docstring); atomic. Without one (not
    under the Cog server) nothing happens; one that cannot be rewritten leaves `null` refused and list items
    unchecked, with a warning."""
    if not path.is_file():
        logger.info("no %s here: inputs are not validated by a Cog server", path)
        return
    try:
        schema = json.loads(path.read_text())
        text = json.dumps(served_schema(schema))
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(text)
        os.replace(partial, path)
    except (OSError, ValueError) as e:
        logger.warning(
            "could not rewrite %s (%s): null stays refused for nullable inputs, list items unchecked", path, e
        )
