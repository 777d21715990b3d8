"""predict.py as `cog build` reads it: statically, by Cog's rules (script/cog_parse.py cites them). Every
input is read, with the values Python sees; every literal is the constant the library validates with; and the
forms Cog refuses or changes silently are caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flux import images, sampling
from flux.lora import MAX_LORA_STRENGTH, MAX_LORAS, MIN_LORA_STRENGTH, LoraRequest
from flux.pipeline import (
    MAX_EXTRA_IMAGES,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    MAX_STRENGTH,
    MIN_GUIDANCE,
    MIN_STEPS,
    MIN_STRENGTH,
    EditRequest,
    MultiImageMode,
)
from flux.taylor_seer_utils import SCHEDULE_NAMES
from script.cog_parse import UNSET, CogSchemaError, parse_predictor, read_predictor
from script.openapi_schema import build_schema, silent_changes
from serving.server import AUTO, MEGAPIXELS, RANDOM_SEED, Inputs

ROOT = Path(__file__).resolve().parent.parent
PREDICT = (ROOT / "predict.py").read_text()

# (input, Input() keyword) -> the constant it must equal. Every literal in predict.py is here, and every
# entry here is in predict.py.
CONSTANTS = {
    ("input_images", "default"): None,
    ("multi_image_mode", "choices"): [mode.value for mode in MultiImageMode],
    ("multi_image_mode", "default"): MultiImageMode.STITCH.value,
    ("mask", "default"): None,
    ("strength", "ge"): MIN_STRENGTH,
    ("strength", "le"): MAX_STRENGTH,
    ("strength", "default"): EditRequest.__dataclass_fields__["strength"].default,
    ("aspect_ratio", "choices"): images.ASPECT_RATIOS,
    ("aspect_ratio", "default"): images.MATCH_INPUT_IMAGE,
    ("megapixels", "choices"): list(MEGAPIXELS),
    ("megapixels", "default"): next(name for name, value in MEGAPIXELS.items() if value == 1.0),
    ("num_inference_steps", "ge"): MIN_STEPS,
    ("num_inference_steps", "le"): MAX_STEPS,
    ("num_inference_steps", "default"): sampling.DEFAULT_STEPS,
    ("guidance", "ge"): MIN_GUIDANCE,
    ("guidance", "le"): MAX_GUIDANCE,
    ("guidance", "default"): sampling.DEFAULT_GUIDANCE,
    ("seed", "ge"): RANDOM_SEED,
    ("seed", "le"): MAX_SEED,
    ("seed", "default"): None,
    ("output_format", "choices"): [f.value for f in images.OutputFormat],
    ("output_format", "default"): images.DEFAULT_FORMAT.value,
    ("output_quality", "ge"): images.MIN_QUALITY,
    ("output_quality", "le"): images.MAX_QUALITY,
    ("output_quality", "default"): images.DEFAULT_QUALITY,
    ("disable_safety_checker", "default"): False,
    ("go_fast", "default"): True,
    ("acceleration", "choices"): [AUTO, *SCHEDULE_NAMES],
    ("acceleration", "default"): AUTO,
    ("lora_weights", "default"): None,
    ("lora_strength", "ge"): MIN_LORA_STRENGTH,
    ("lora_strength", "le"): MAX_LORA_STRENGTH,
    ("lora_strength", "default"): None,
}
KEYWORDS = ("default", "choices", "ge", "le", "min_length", "max_length", "regex")


def cog_inputs(source: str = PREDICT) -> dict:
    return {i.name: i for i in parse_predictor(source).inputs}


def test_cog_reads_every_input_as_python_sees_it():
    assert silent_changes() == []
    assert list(cog_inputs()) == list(Inputs.__dataclass_fields__)  # and the server takes exactly these


def test_every_literal_is_a_library_constant_and_every_constant_a_literal():
    found = {
        (name, key): getattr(i, key)
        for name, i in cog_inputs().items()
        for key in KEYWORDS
        if getattr(i, key) is not UNSET
    }
    assert set(found) == set(CONSTANTS)
    for where, constant in CONSTANTS.items():
        assert found[where] == constant and type(found[where]) in (type(constant), float), where
    described = {name: i.description for name, i in cog_inputs().items()}
    assert f"Up to {MAX_EXTRA_IMAGES} more" in described["input_images"]
    assert str(MAX_SEED) in described["seed"] and f"{RANDOM_SEED} or blank" in described["seed"]
    assert described["lora_weights"].startswith(f"Up to {MAX_LORAS} LoRAs")
    strength = LoraRequest.__dataclass_fields__["strength"].default
    assert (
        f"each from {MIN_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g}; left out, {strength:g} for each"
        in (described["lora_strength"])
    )


def test_inputs_match_replicates_model():
    inputs = cog_inputs()
    assert inputs["aspect_ratio"].choices == [
        "match_input_image",
        *["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"],
    ]
    assert (inputs["num_inference_steps"].ge, inputs["num_inference_steps"].le) == (4, 50)
    assert inputs["num_inference_steps"].default == 28
    assert (inputs["guidance"].ge, inputs["guidance"].le, inputs["guidance"].default) == (0, 10, 2.5)
    assert inputs["output_format"].choices == ["webp", "jpg", "png"] and inputs["output_format"].default == "webp"
    assert inputs["output_quality"].default == 80 and inputs["go_fast"].default is True


def test_the_schema_has_what_the_server_serves():
    schema = build_schema()["components"]["schemas"]
    props = schema["Input"]["properties"]
    assert schema["Input"]["required"] == ["prompt", "input_image"]
    assert props["seed"] == {
        "x-order": 10,
        "title": "Seed",
        "type": "integer",
        "nullable": True,
        "default": None,
        "description": cog_inputs()["seed"].description,
        "minimum": -1,
        "maximum": 9007199254740991,  # a float64 exactly: Cog writes bounds as float64
    }
    assert schema["aspect_ratio"]["enum"] == images.ASPECT_RATIOS and schema["aspect_ratio"]["type"] == "string"
    assert props["input_images"]["type"] == "array" and props["input_images"]["items"]["format"] == "uri"
    assert props["mask"]["format"] == "uri" and props["mask"]["nullable"] is True
    assert (props["strength"]["minimum"], props["strength"]["maximum"], props["strength"]["default"]) == (0, 1, 1)
    # Lists of strings and of numbers; Cog writes a list's bounds beside the array (serving/openapi.py moves them
    # onto its items for coglet).
    assert props["lora_weights"]["items"] == {"type": "string"} and props["lora_weights"]["nullable"] is True
    assert props["lora_strength"]["type"] == "array" and props["lora_strength"]["items"] == {"type": "number"}
    assert (props["lora_strength"]["minimum"], props["lora_strength"]["maximum"]) == (-1, 3)
    assert schema["Output"] == {"type": "string", "format": "uri", "title": "Output"}


def test_the_script_prints_the_schema():
    out = subprocess.run(
        [sys.executable, "script/openapi_schema.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == build_schema()


# ---- forms Cog refuses or changes: each edit of predict.py must be caught -----------------------------------


def variant(tmp_path: Path, old: str, new: str, preamble: str = "") -> str:
    """predict.py with `old` replaced by `new` (and `preamble` after the imports), written to tmp_path."""
    assert old in PREDICT, old
    source = PREDICT.replace(old, new, 1).replace("\n\nlogging.basicConfig", f"\n{preamble}\n\nlogging.basicConfig")
    path = tmp_path / "predict_variant.py"
    path.write_text(source)
    return f"{path}:Predictor"


CHOICES = 'choices=["stitch", "separate"]'
REFUSED = {  # the build fails (ErrChoicesNotResolvable, ErrDefaultNotResolvable)
    "comprehension": (CHOICES, "choices=[m.value for m in MultiImageMode]", "from flux.pipeline import MultiImageMode"),
    "imported-name": (CHOICES, "choices=CHOICES", "from flux.pipeline import MAX_SEED as CHOICES"),
    "attribute": (CHOICES, "choices=images.ASPECT_RATIOS", "from flux import images"),
    "tuple": (CHOICES, 'choices=("stitch", "separate")', ""),
    "set-name": (CHOICES, "choices=MODES", 'MODES = {"stitch", "separate"}'),
    "call": (CHOICES, 'choices=sorted(["stitch", "separate"])', ""),
}
CHANGED = {  # the build succeeds with another value than Python's
    "attribute-default": ("default=28)", "default=sampling.DEFAULT_STEPS)", "from flux import sampling"),
    "computed-name-default": ("default=28)", "default=STEPS)", "STEPS = 2 * 14"),
    "named-bound": ("ge=4, le=50", "ge=MIN_STEPS, le=50", "from flux.pipeline import MIN_STEPS"),
    "expression-bound": ("le=9007199254740991", "le=2**53 - 1", ""),
    "rounded-bound": ("le=9007199254740991", "le=9223372036854775807", ""),
    "f-string": ('description="Denoising steps."', 'description=f"Denoising steps ({4}-50)."', ""),
    "concatenated": ('description="Denoising steps."', 'description="Denoising " "steps."', ""),
    "escape": ('description="Denoising steps."', 'description="Denoising\\tsteps."', ""),
    "positional": ('Input(description="Denoising steps.", ge=4, le=50, default=28)', "Input(28, ge=4, le=50)", ""),
}
KEPT = {  # forms Cog resolves: no change
    "module-literal-name": ('default="stitch"', "default=MODE", 'MODE = "stitch"'),
    "dict-keys": (CHOICES, "choices=list(MODES.keys())", 'MODES = {"stitch": 1, "separate": 2}'),
    "concatenated-lists": (CHOICES, 'choices=["stitch"] + REST', 'REST = ["separate"]'),
    "module-description": (
        'description="Denoising steps."',
        "description=STEPS_TEXT",
        'STEPS_TEXT = "Denoising steps."',
    ),
}


@pytest.mark.parametrize("old,new,preamble", REFUSED.values(), ids=REFUSED)
def test_forms_cog_refuses_fail(tmp_path, old, new, preamble):
    ref = variant(tmp_path, old, new, preamble)
    with pytest.raises(CogSchemaError, match="multi_image_mode: choices expression cannot be statically resolved"):
        read_predictor(ref)


@pytest.mark.parametrize("old,new,preamble", CHANGED.values(), ids=CHANGED)
def test_forms_cog_changes_silently_fail(tmp_path, old, new, preamble):
    changes = silent_changes(variant(tmp_path, old, new, preamble))
    assert len(changes) == 1 and changes[0].startswith(("num_inference_steps:", "seed:")), changes


@pytest.mark.parametrize("old,new,preamble", KEPT.values(), ids=KEPT)
def test_forms_cog_resolves_pass(tmp_path, old, new, preamble):
    ref = variant(tmp_path, old, new, preamble)
    assert silent_changes(ref) == []
    assert build_schema(ref) == build_schema()


def test_a_plain_default_cog_cannot_resolve_fails_the_build(tmp_path):
    ref = variant(
        tmp_path,
        "disable_safety_checker: bool = Input(",
        "no_check: bool = OFF,\n        disable_safety_checker: bool = Input(",
        "from flux.pipeline import MAX_SEED as OFF",
    )
    with pytest.raises(CogSchemaError, match="'no_check': default `OFF` cannot be statically resolved"):
        read_predictor(ref)


def test_what_cog_reads_from_literals():
    """The literal rules themselves, on a small predictor: strings keep escapes and lose only outer quotes,
    bounds become float64, a tuple keeps what it can read, an unreadable Input default becomes None."""
    source = """
from cog import BasePredictor, Input as In
A = ("x", len("y"), "z")
class Predictor(BasePredictor):
    def predict(
        self,
        a: str = In(description="tab\\there", choices=A, default="x"),
        b: int = In(ge=-3, le=1e3, default=-0x10),
        c: float | None = In(default=print),
        d: list[int] = In(default=[1, 2]),
        e: str = In(description=r"raw\\n" "more"),
    ) -> str:
        return ""
"""
    inputs = {i.name: i for i in parse_predictor(source).inputs}
    assert inputs["a"].description == "tab\\there" and inputs["a"].choices == ["x", "z"]
    assert (inputs["b"].ge, inputs["b"].le, inputs["b"].default) == (-3.0, 1000.0, -16)
    assert isinstance(inputs["b"].ge, float)
    assert inputs["c"].default is None and inputs["c"].type.nullable
    assert inputs["d"].default == [1, 2] and inputs["d"].type.kind == "array"
    assert inputs["e"].description == 'raw\\n" "more'
