"""Make the schema the Cog server validates with and serves say what it accepts: `null` for the inputs it marks
nullable, the items of a list input checked against the bounds it gives, and no prediction request without an
`input`; and say it in the form whose refusals tell a client why.

`cog build` writes OpenAPI 3.0.2 and marks an input declared `X | None` with `"nullable": true`
(replicate/cog pkg/schema/openapi_spec.go), which means that `null` is a valid value. coglet validates requests
with the `jsonschema` crate (0.29; crates/coglet/src/input_validation.rs compiles the Input schema with
`jsonschema::validator_for`, which reads a schema without `$schema` as JSON Schema draft 2020-12). That dialect has
no `nullable`, so coglet answers `null` with 422 "null is not of type ...": a client that sends `"seed": null` for
"no seed" (what JavaScript and Python clients do for an unset value) is refused although the schema allows it.

coglet reads .cog/openapi_schema.json when setup has finished (crates/coglet/src/worker.rs: "Load the pre-built
schema" comes after the predictor's setup), so setup restates the document as OpenAPI 3.1, whose schemas are
draft 2020-12 — the dialect that validator speaks — and writes each nullable input's type as `[TYPE, "null"]`.
Its bounds and items stay beside that type, where they apply to values of their own type only: `null` passes
them, and a value that breaks one is refused by that keyword, so coglet's 422 (the validator's message, verbatim)
says why: `-5 is less than the minimum of -1`, `"owner/name" is not of types "array", "null"`. (3.0 has no type
lists; its other way to admit `null`, an `anyOf` of the type and `null`, makes every refusal read "... is not valid
under any of the schemas listed in the 'anyOf' keyword".) `nullable` stays: 3.1 lets a schema carry keywords it
does not define, and coglet reads it (an absent nullable input without a default is passed as `null`). Nothing
else about the inputs changes, and a rewritten input is left as it is, so running this twice changes nothing.
tests/test_deploy.py checks, through the real server, that every input the schema marks nullable takes `null`, and
that every other one refuses it with a 422 naming it; tests/test_server.py holds the exact 422 messages.

A list input with `ge`/`le` (`list[float]`: lora_strength) gets them as the array's own `minimum`/`maximum`
(openapi_spec.go writes an input's bounds beside its type, whatever the type), where JSON Schema applies them
to numbers only: coglet lets any item through. Cog's Python SDK checks such bounds on every item
(cog/_inspector.py), which is what they mean; so setup moves them into `items`, where coglet checks each item and
answers one out of range with a 422 at `lora_strength/N`, the input and the item (coglet writes an error's JSON
pointer as the field).

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
OPENAPI_VERSION = "3.1.0"  # the first OpenAPI whose schemas are JSON Schema 2020-12, as coglet's validator reads them
NULL = "null"


def accept_null(schema: dict) -> dict:
    """`schema` (an OpenAPI document from `cog build`) with every nullable input accepting `null`: `null` added to
    its type (a union input, which has none, gets a `null` variant), in OpenAPI 3.1."""
    properties = schema.get("components", {}).get("schemas", {}).get("Input", {}).get("properties", {})
    for prop in properties.values():
        if prop.get("nullable") is not True:
            continue
        kind = prop.get("type")
        if isinstance(kind, str):
            prop["type"] = [kind, NULL]
        elif isinstance(kind, list) and NULL not in kind:
            kind.append(NULL)
        elif kind is None and isinstance(prop.get("anyOf"), list) and {"type": NULL} not in prop["anyOf"]:
            prop["anyOf"].append({"type": NULL})
    if "openapi" in schema:
        schema["openapi"] = OPENAPI_VERSION
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
    """`schema` as coglet is given it, in OpenAPI 3.1: list items bounded, `null` accepted where it is nullable,
    `input` required."""
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
