"""Offline loading: the model class comes from the config's architectures, the image processor from its saved type."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import transformers

from interp.loading import checkpoint_arch, load_image_processor, model_class_for


def test_model_class_for_supported_and_unsupported_configs():
    assert model_class_for(SimpleNamespace(architectures=["LlavaForConditionalGeneration"])) is \
        transformers.LlavaForConditionalGeneration
    with pytest.raises(NotImplementedError, match="unsupported architecture.*GPT2LMHeadModel.*supported"):
        model_class_for(SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(NotImplementedError, match="SimpleNamespace"):
        model_class_for(SimpleNamespace())


def test_checkpoint_arch_reads_config_json_only(tmp_path):
    def saved(config) -> str:
        (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return checkpoint_arch(tmp_path)

    assert saved({"architectures": ["LlavaForConditionalGeneration"]}) == "llava"
    assert saved({"architectures": ["GPT2LMHeadModel", "Qwen2_5_VLForConditionalGeneration"]}) == "qwen2_5_vl"
    # cannot be told: left to loading, which names the problem
    assert saved({"architectures": ["GPT2LMHeadModel"]}) is None
    assert saved({"model_type": "llava"}) is None
    assert saved({"architectures": "LlavaForConditionalGeneration"}) is None
    assert saved("{not json") is None and saved("[]") is None
    assert checkpoint_arch(tmp_path / "missing") is None


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_load_image_processor_picks_the_pil_twin_and_names_unknown_types(arch, tmp_path):
    from interp.tiny import tiny_vlm

    tiny_vlm(arch, seed=0).image_processor.save_pretrained(tmp_path)
    cfg_file = tmp_path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    kind = cfg["image_processor_type"]  # CLIPImageProcessor / Qwen2VLImageProcessor
    assert type(load_image_processor(tmp_path)).__name__ == kind + "Pil"
    cfg["image_processor_type"] = kind + "Fast"  # a checkpoint saved with the torchvision-backed processor
    cfg_file.write_text(json.dumps(cfg))
    assert type(load_image_processor(tmp_path)).__name__ == kind + "Pil"
    cfg["image_processor_type"] = "NoSuchImageProcessor"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown image_processor_type 'NoSuchImageProcessor'"):
        load_image_processor(tmp_path)


def test_a_local_path_that_is_not_a_checkpoint_is_named(tmp_path):
    from interp import HookedVLM

    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.*does not exist"):
        HookedVLM.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HookedVLM.from_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        HookedVLM.from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedVLM.from_pretrained("./no/such/checkpoint")


def test_local_checkpoint_expands_home_and_leaves_hub_ids(tmp_path, monkeypatch):
    from interp.loading import local_checkpoint

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_checkpoint("~/ckpt") == tmp_path / "ckpt"
    assert local_checkpoint("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id: transformers' call


def test_from_pretrained_without_progress_hides_the_loading_bar_for_that_call_only(tiny_llava, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    from interp import HookedVLM

    tiny_llava.save_pretrained(tmp_path / "ckpt")
    assert hf_logging.is_progress_bar_enabled()
    HookedVLM.from_pretrained(tmp_path / "ckpt", progress=False)
    assert "Loading weights" not in capsys.readouterr().err and hf_logging.is_progress_bar_enabled()  # restored
    HookedVLM.from_pretrained(tmp_path / "ckpt")
    assert "Loading weights" in capsys.readouterr().err
