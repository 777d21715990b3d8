"""Print the OpenAPI schema of the predictor's inputs, as `cog build` writes it to
.cog/openapi_schema.json. The Cog server validates requests against that file only: without it
a missing or out-of-range input would reach the predictor unchecked.

    python script/openapi_schema.py [predict.py:Predictor]
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _number(x: float) -> int | float:
    return x if isinstance(x, int) else int(x) if float(x).is_integer() else x


def build_schema(predictor_ref: str = "predict.py:Predictor") -> dict:
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
        prop: dict = {"title": name.replace("_", " ").title(), "x-order": field.order}
        if field.choices is not None:
            enums[name] = {"title": name, "description": "An enumeration.", "enum": list(field.choices)}
            enums[name].update(field.type.json_type())
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop.update(field.type.json_type())
        if field.description:
            prop["description"] = field.description
        if field.default is not None:
            prop["default"] = field.default
        elif field.type.repetition is Repetition.OPTIONAL:
            prop["nullable"] = True
        else:
            required.append(name)
        if field.ge is not None:
            prop["minimum"] = _number(declared[name].default.ge)
        if field.le is not None:
            prop["maximum"] = _number(declared[name].default.le)
        properties[name] = prop

    input_schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {"Input": input_schema, "Output": info.output.json_type(), **enums}},
    }


if __name__ == "__main__":
    print(json.dumps(build_schema(*sys.argv[1:2]), indent=2))
