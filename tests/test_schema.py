"""The schema script/serve hands to the Cog server matches the inputs predict.py declares."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

from cog.input import FieldInfo

import predict

ROOT = Path(__file__).resolve().parent.parent


def declared_inputs() -> dict[str, FieldInfo]:
    params = inspect.signature(predict.Predictor.run).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def generated_schema() -> dict:
    out = subprocess.run(
        [sys.executable, "script/openapi_schema.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def test_schema_matches_declared_inputs():
    schema = generated_schema()["components"]["schemas"]
    props = schema["Input"]["properties"]
    declared = declared_inputs()
    assert list(props) == list(declared)
    assert schema["Input"]["required"] == ["prompt", "input_image"]
    for name, field in declared.items():
        prop = props[name]
        assert prop.get("default") == field.default, name
        assert prop.get("minimum") == field.ge, name
        assert prop.get("maximum") == field.le, name
        if field.choices:
            enum = schema[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
            assert enum == list(field.choices), name
        else:
            assert "allOf" not in prop
    assert props["seed"]["type"] == "integer" and "seed" not in schema["Input"]["required"]
    assert props["input_image"]["format"] == "uri"
    assert schema["Output"]["format"] == "uri"


def test_inputs_match_replicates_model():
    declared = declared_inputs()
    assert declared["aspect_ratio"].choices == [
        "match_input_image",
        "1:1",
        "16:9",
        "21:9",
        "3:2",
        "2:3",
        "4:5",
        "5:4",
        "3:4",
        "4:3",
        "9:16",
        "9:21",
    ]
    assert (declared["num_inference_steps"].ge, declared["num_inference_steps"].le) == (4, 50)
    assert declared["num_inference_steps"].default == 28
    assert (declared["guidance"].ge, declared["guidance"].le, declared["guidance"].default) == (0, 10, 2.5)
    assert declared["output_format"].choices == ["webp", "jpg", "png"] and declared["output_format"].default == "webp"
    assert declared["output_quality"].default == 80 and declared["go_fast"].default is True
