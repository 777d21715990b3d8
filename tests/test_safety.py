"""The safety checker on the tiny checkers: both stages, strict loading, the hub fallback (with a
stand-in for the hub: no network), the switch."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux import safety
from flux.errors import WeightsError
from flux.safety import SafetyChecker
from flux.tiny import write_tiny_safety_checkers
from tests.conftest import make_image

IMAGE = make_image(1248, 832)


def checker(tmp_path, concept_flags: bool, classifier_flags: bool) -> SafetyChecker:
    write_tiny_safety_checkers(tmp_path, concept_flags, classifier_flags)
    return SafetyChecker.from_pretrained(tmp_path).to("cpu")


def test_an_image_the_concept_checker_passes_is_not_classified(tmp_path):
    c = checker(tmp_path, concept_flags=False, classifier_flags=True)
    c.warm_up()  # runs both stages whatever the verdicts
    verdict = c.check(IMAGE)
    assert not verdict.concept_flagged and verdict.label is None and not verdict.unsafe
    assert str(verdict).startswith("passed in ")


def test_the_classifier_can_clear_a_flagged_image(tmp_path):
    verdict = checker(tmp_path, concept_flags=True, classifier_flags=False).check(IMAGE)
    assert verdict.concept_flagged and verdict.label == "normal" and not verdict.unsafe
    assert verdict.nsfw_probability < 0.01
    assert "cleared by the NSFW classifier" in str(verdict)


def test_flagged_by_both_is_unsafe(tmp_path):
    verdict = checker(tmp_path, concept_flags=True, classifier_flags=True).check(IMAGE)
    assert verdict.unsafe and verdict.label == "nsfw" and verdict.nsfw_probability > 0.99
    assert str(verdict).startswith("flagged by the concept checker and by the NSFW classifier (nsfw 1.00) in ")
    assert verdict.seconds > 0


def test_small_and_odd_images_are_checked(tmp_path):
    c = checker(tmp_path, concept_flags=True, classifier_flags=True)
    for size in [(16, 16), (3, 500), (1568, 672)]:
        assert c.check(make_image(*size)).unsafe


def rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "folder,edit,named",
    [
        (safety.SAFETY_CHECKER, lambda t: t.pop("concept_embeds_weights"), "missing keys: concept_embeds_weights"),
        (safety.SAFETY_CHECKER, lambda t: t.update({"stray": torch.zeros(1)}), "unexpected keys: stray"),
        (safety.NSFW_CLASSIFIER, lambda t: t.pop("classifier.bias"), "missing keys: classifier.bias"),
        (safety.NSFW_CLASSIFIER, lambda t: t.update({"classifier.bias": torch.zeros(3)}), "classifier.bias"),
    ],
)
def test_damaged_weights_are_named(tmp_path, folder, edit, named):
    write_tiny_safety_checkers(tmp_path)
    rewrite(tmp_path / folder / "model.safetensors", edit)
    with pytest.raises(WeightsError, match=rf"^{folder}/ does not match .*{named}"):
        SafetyChecker.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "missing", ["safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json", "nsfw_classifier"]
)
def test_missing_files_are_named(tmp_path, missing):
    write_tiny_safety_checkers(tmp_path)
    target = tmp_path / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError, match=f"could not load {missing.split('/')[0]}/"):
        SafetyChecker.from_pretrained(tmp_path)


def test_a_classifier_without_an_nsfw_label_is_refused(tmp_path):
    write_tiny_safety_checkers(tmp_path)
    config = tmp_path / safety.NSFW_CLASSIFIER / "config.json"
    config.write_text(config.read_text().replace('"nsfw"', '"other"'))
    with pytest.raises(WeightsError, match="nsfw_classifier/ has labels"):
        SafetyChecker.from_pretrained(tmp_path)


@pytest.fixture
def hub(tmp_path):
    """A stand-in for the two hub repositories, with their files as the hub has them: the concept
    checker as a pytorch_model.bin with the key names it was saved with in 2022 (vision_model.vision_model.*,
    and the position_ids buffer) and its processor as a CLIPFeatureExtractor config of that time,
    the classifier as model.safetensors. Returns (download, calls)."""
    tiny = tmp_path / "tiny"
    write_tiny_safety_checkers(tiny, concept_flags=True, classifier_flags=True)
    legacy_processor = {
        "feature_extractor_type": "CLIPFeatureExtractor",
        "size": 224,
        "crop_size": 224,
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy_processor))
    old_keys = {
        (f"vision_model.{k}" if k.startswith("vision_model.") else k): v
        for k, v in load_file(tiny / safety.SAFETY_CHECKER / "model.safetensors").items()
    }
    old_keys["vision_model.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    torch.save(old_keys, tmp_path / "pytorch_model.bin")
    repos = {
        "CompVis/stable-diffusion-safety-checker": {
            "config.json": tiny / safety.SAFETY_CHECKER / "config.json",
            "pytorch_model.bin": tmp_path / "pytorch_model.bin",
            "preprocessor_config.json": tmp_path / "preprocessor_config.json",
        },
        "Falconsai/nsfw_image_detection": {
            name: tiny / safety.NSFW_CLASSIFIER / name
            for name in ("config.json", "model.safetensors", "preprocessor_config.json")
        },
    }
    calls = []

    def download(repo, filename, folder):
        calls.append((repo, filename))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".cache").mkdir(exist_ok=True)  # huggingface_hub's bookkeeping
        shutil.copy(repos[repo][filename], folder / filename)

    return download, calls


def test_missing_checkers_are_downloaded_into_the_weights_directory(tmp_path, hub):
    download, calls = hub
    weights = tmp_path / "weights"
    weights.mkdir()
    safety.ensure_weights(weights, download)
    assert sorted(p.name for p in weights.iterdir()) == sorted(safety.CHECKER_FOLDERS)  # no staging left behind
    assert not (weights / safety.SAFETY_CHECKER / ".cache").exists()
    assert len(calls) == 6
    downloaded = SafetyChecker.from_pretrained(weights)
    assert downloaded.check(IMAGE).unsafe
    clip_input = downloaded.feature_extractor(images=[IMAGE], return_tensors="pt").pixel_values
    assert clip_input.shape == (1, 3, 224, 224)
    safety.ensure_weights(weights, download)
    assert len(calls) == 6  # nothing downloaded twice


def test_only_missing_folders_are_downloaded(tmp_path, hub):
    download, calls = hub
    write_tiny_safety_checkers(tmp_path / "weights")
    shutil.rmtree(tmp_path / "weights" / safety.FEATURE_EXTRACTOR)
    safety.ensure_weights(tmp_path / "weights", download)
    assert calls == [("CompVis/stable-diffusion-safety-checker", "preprocessor_config.json")]
    assert not SafetyChecker.from_pretrained(tmp_path / "weights").check(IMAGE).concept_flagged  # still the local one


def test_a_failed_download_leaves_no_folder_and_says_what_to_do(tmp_path, hub):
    download, _ = hub

    def fails_midway(repo, filename, folder):
        if filename == "pytorch_model.bin":
            raise ConnectionError("no network")
        download(repo, filename, folder)

    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(WeightsError) as e:
        safety.ensure_weights(weights, fails_midway)
    assert "safety_checker/, feature_extractor/ are not in" in str(e.value)
    assert "CompVis/stable-diffusion-safety-checker failed (ConnectionError: no network)" in str(e.value)
    assert "FLUX_SAFETY_CHECKER=off" in str(e.value)
    assert list(weights.iterdir()) == []


def test_the_switch(tmp_path, monkeypatch):
    write_tiny_safety_checkers(tmp_path)
    monkeypatch.setenv("FLUX_SAFETY_CHECKER", "off")
    assert safety.checker_from_env(tmp_path / "anywhere") is None
    monkeypatch.setenv("FLUX_SAFETY_CHECKER", "no")
    with pytest.raises(ValueError, match="FLUX_SAFETY_CHECKER must be 'on' or 'off'"):
        safety.checker_from_env(tmp_path)
    monkeypatch.delenv("FLUX_SAFETY_CHECKER")
    assert isinstance(safety.checker_from_env(tmp_path), SafetyChecker)
