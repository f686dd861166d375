"""Hook names: the grammar, execution order, globs, and helpful errors."""
from __future__ import annotations

import pytest

from interp.names import HookNameError, all_hook_names, layer_of, parse_block_name, resolve_names


def test_all_hook_names_order_and_count():
    names = all_hook_names(n_layers=3, n_vision_layers=2)
    assert len(names) == 1 + 2 * 5 + 3 + 3 * 5 + 2
    assert names[0] == "vision.hook_embed" and names[-1] == "hook_logits"
    assert names.index("projector.hook_out") < names.index("hook_embed") < names.index("blocks.0.hook_resid_pre")
    assert names.index("blocks.0.hook_resid_post") < names.index("blocks.1.hook_resid_pre")
    block = [n for n in names if n.startswith("blocks.1.")]
    assert block == [f"blocks.1.{s}" for s in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]


def test_parse_and_layer_of():
    assert parse_block_name("vision.blocks.3.hook_attn_out") == ("vision", 3, "hook_attn_out")
    assert parse_block_name("blocks.12.hook_resid_pre") == ("lm", 12, "hook_resid_pre")
    assert parse_block_name("hook_embed") is None
    assert layer_of("blocks.7.hook_mlp_out") == 7 and layer_of("hook_logits") is None


def test_resolve_globs_lists_and_predicates():
    valid = all_hook_names(3, 2)
    assert resolve_names("blocks.*.hook_resid_post", valid) == [f"blocks.{l}.hook_resid_post" for l in range(3)]
    # lists come back in execution order, whatever order they were given in
    assert resolve_names(["hook_logits", "blocks.0.hook_resid_pre"], valid) == ["blocks.0.hook_resid_pre", "hook_logits"]
    assert resolve_names(lambda n: n.startswith("projector"), valid) == ["projector.hook_in", "projector.hook_out"]


def test_unknown_name_lists_closest_valid_names():
    valid = all_hook_names(3, 2)
    with pytest.raises(HookNameError) as err:
        resolve_names(["blocks.1.hook_resid_psot"], valid)
    assert "blocks.1.hook_resid_post" in str(err.value) and "Closest valid names" in str(err.value)
    with pytest.raises(HookNameError):
        resolve_names("blocks.9.*", valid)  # a glob that matches nothing
    with pytest.raises(HookNameError):
        resolve_names([], valid)
    with pytest.raises(HookNameError):
        resolve_names(lambda n: False, valid)


def test_model_rejects_unknown_names(tiny_llava):
    inputs = tiny_llava.encode(prompts=["who is he"])
    with pytest.raises(HookNameError, match="blocks.2.hook_resid_pre"):
        tiny_llava.run_with_cache(inputs, names=["blocks.2.hook_resid_pr"])
    with pytest.raises(HookNameError):
        tiny_llava.run_with_hooks(inputs, hooks=[("blocks.99.hook_resid_pre", lambda x, c: x)])


def test_finer_sites_parse_and_order():
    from interp.names import SITE_ORDER, is_read_only

    assert parse_block_name("blocks.2.attn.hook_z") == ("lm", 2, "attn.hook_z")
    assert parse_block_name("vision.blocks.0.ln1.hook_normalized") == ("vision", 0, "ln1.hook_normalized")
    assert parse_block_name("blocks.2.attn.q.hook_z") is None  # one dotted level, as TransformerLens names them
    names = all_hook_names(2, 1, lm_sites=["mlp.hook_post", "attn.hook_z", *SITE_ORDER[:1], "hook_attn_out",
                                             "hook_resid_mid", "hook_mlp_out", "hook_resid_post"])
    block = [n.split(".", 2)[2] for n in names if n.startswith("blocks.1.")]
    assert block == ["hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_post",
                     "hook_mlp_out", "hook_resid_post"]  # given in any order, listed in execution order
    with pytest.raises(ValueError, match="unknown per-block sites"):
        all_hook_names(1, 1, lm_sites=["hook_resid_pre", "attn.hook_zz"])
    with pytest.raises(ValueError, match="residual-level"):
        all_hook_names(1, 1, lm_sites=["attn.hook_z"])
    assert is_read_only("blocks.0.attn.hook_pattern") and not is_read_only("blocks.0.attn.hook_z")
    assert not is_read_only("hook_logits")


def test_read_only_sites_leave_globs_and_are_refused_by_name():
    from interp.names import SITE_ORDER, resolve_names_except_read_only

    valid = all_hook_names(2, 1, lm_sites=SITE_ORDER)
    got = resolve_names_except_read_only("blocks.0.attn.*", valid, "why")
    assert got == ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z"]
    assert len(resolve_names_except_read_only(None, valid, "why")) == len(valid) - 2  # one pattern per LM block
    with pytest.raises(ValueError, match="because"):
        resolve_names_except_read_only(["blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern"], valid, "because")
    with pytest.raises(ValueError, match="because"):
        resolve_names_except_read_only("blocks.*.attn.hook_pattern", valid, "because")  # nothing else matched
