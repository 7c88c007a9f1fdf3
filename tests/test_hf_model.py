"""The Hugging Face model (megatron_moma/hf/modeling_moma.py), loaded as remote code from a saved
folder, against Megatron's world-size-1 models of the same weights (tests/test_hf_mapping.py
builds them): equal logits in Megatron's causal inference routing for every architecture, cached
generation equal to step-by-step full forwards, causality, and padding.
"""

import functools
import os
import re
import shutil
import tempfile

import pytest
import torch
from test_hf_mapping import VARIANTS, VOCABULARY, megatron_runs
from transformers import AutoModelForCausalLM

from megatron_moma.hf import mapping
from megatron_moma.hf.modeling_moma import CACHE_FIELD, MoMaForCausalLM

# fp32 logits of O(1): the two sides differ only in the order of floating-point operations
# (measured: at most 2.3e-6, logits up to 6).
LOGITS_ATOL = 1e-5
ROUTED = ["moma", "moma-token-choice", "moe_8x", "mot+moma", "dense+mod", "moma+mod", "mot+mod"]


@functools.lru_cache(maxsize=None)
def hf_model(name: str):
    """Variant `name` converted from Megatron, saved with the remote-code files, and loaded back
    with AutoModelForCausalLM(trust_remote_code=True, local_files_only=True)."""
    run = megatron_runs()[name]
    config = mapping.hf_config_from_run_config(run.run_config)
    model = MoMaForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        mapping.megatron_to_hf_state_dict(run.state_dict, config), strict=False)
    assert unexpected == [] and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    with tempfile.TemporaryDirectory() as parent:
        # A fixed folder name: transformers caches remote code per folder name, so runs reuse it.
        folder = os.path.join(parent, "megatron_moma_" + re.sub(r"\W", "_", name))
        model.save_pretrained(folder)
        for path in mapping.HF_MODEL_FILES:
            shutil.copy(path, folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                      local_files_only=True)
    assert type(loaded).__module__.startswith("transformers_modules.")  # the shipped code
    return loaded.eval()


def auxiliary_router_outputs(model, tokens) -> dict:
    """{module name: its outputs, flattened} of every auxiliary router the forward pass runs."""
    outputs = {}

    def record(name):
        return lambda module, args, out: outputs.setdefault(name, []).append(out.detach().reshape(-1))

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if type(module).__name__ == "AuxiliaryRouter"]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in outputs.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_megatron_in_causal_routing(name):
    run = megatron_runs()[name]
    model = hf_model(name)
    with torch.no_grad():
        logits = model(run.tokens).logits
    assert logits.shape == run.logits.shape == (3, 12, 128)
    torch.testing.assert_close(logits, run.logits, atol=LOGITS_ATOL, rtol=0)
    # The routing decisions are real ones: the auxiliary routers send some tokens and not others
    # (every MoD router does both), none within rounding distance of the 0.5 threshold.
    scores = auxiliary_router_outputs(model, run.tokens)
    if scores:
        every = torch.cat(list(scores.values()))
        assert (every > 0.5).any() and (every < 0.5).any()
        assert (every - 0.5).abs().min() > 1e-4
    for mod_router in (s for n, s in scores.items() if n.endswith("mod_aux_router")):
        assert (mod_router > 0.5).any() and (mod_router < 0.5).any()


@pytest.mark.parametrize("name", ROUTED + ["dense"])
def test_generate_with_cache_equals_step_by_step_full_forward(name):
    model = hf_model(name)
    prompt = megatron_runs()[name].tokens[:, :6]  # text + image, text, image
    steps = 6
    generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True,
                               return_dict_in_generate=True, output_logits=True,
                               eos_token_id=None, pad_token_id=VOCABULARY.eod)
    ids = prompt
    with torch.no_grad():
        for step in range(steps):
            full = model(ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(generated.logits[step], full, atol=LOGITS_ATOL, rtol=0)
            ids = torch.cat([ids, full.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated.sequences, ids)


@pytest.mark.parametrize("name", ROUTED)
def test_chunk_by_chunk_cached_forward_equals_the_full_forward(name):
    """The mixed batch fed through the cache in chunks of 1 to 3 tokens: the cached steps cross
    text -> image -> text boundaries in every MoD, MoT and MoMa layer."""
    model = hf_model(name)
    tokens = megatron_runs()[name].tokens
    bounds = [0, 2, 3, 6, 7, 9, 10, 12]
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache, logits = None, []
        for start, end in zip(bounds, bounds[1:]):
            step = model(tokens[:, start:end], **{CACHE_FIELD: cache}, use_cache=True)
            cache = getattr(step, CACHE_FIELD)
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_generate_with_the_default_cache_equals_generate_without_cache(name, num_beams):
    """`generate` as a user calls it: no cache argument, so the saved generation config's
    `use_cache=True` applies and transformers makes (or asks the model for) the cache."""
    model = hf_model(name)
    prompt = megatron_runs()[name].tokens[:, :6]
    options = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False, eos_token_id=None,
                   pad_token_id=VOCABULARY.eod)
    assert model.generation_config.use_cache
    assert torch.equal(model.generate(prompt, **options),
                       model.generate(prompt, use_cache=False, **options))


def test_the_cache_is_taken_under_either_name_and_returned_under_the_running_name():
    model = hf_model("moma+mod")
    tokens = megatron_runs()["moma+mod"].tokens
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        for name in ("past_key_values", "cache"):
            first = model(tokens[:, :7], use_cache=True)
            cache = getattr(first, CACHE_FIELD)
            assert cache.get_seq_length() == 7
            rest = model(tokens[:, 7:], **{name: cache}, use_cache=True)
            assert getattr(rest, CACHE_FIELD) is cache and cache.get_seq_length() == 12
            torch.testing.assert_close(rest.logits, full[:, 7:], atol=LOGITS_ATOL, rtol=0)
        with pytest.raises(ValueError, match="not both"):
            model(tokens, past_key_values=cache, cache=cache)


def test_beam_search_with_cache_equals_beam_search_without():
    model = hf_model("mot+mod")
    prompt = megatron_runs()["mot+mod"].tokens[:, :6]
    options = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                   eos_token_id=None, pad_token_id=VOCABULARY.eod)
    assert torch.equal(model.generate(prompt, use_cache=True, **options),
                       model.generate(prompt, use_cache=False, **options))


@pytest.mark.parametrize("name", ROUTED)
def test_logits_at_a_position_do_not_depend_on_later_tokens(name):
    model = hf_model(name)
    tokens = megatron_runs()[name].tokens
    t = 5
    changed = tokens.clone()
    changed[:, t + 1:] = torch.where(tokens[:, t + 1:] >= 50, tokens[:, t + 1:] - 40,
                                     tokens[:, t + 1:] + 40)  # text <-> image ids
    with torch.no_grad():
        before, after = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    assert (after[:, t + 1:] - before[:, t + 1:]).abs().max() > 1e-2


def test_a_mod_layer_caches_only_the_tokens_it_processed():
    model = hf_model("moma+mod")  # layer 1 is the MoD layer
    tokens = megatron_runs()["moma+mod"].tokens
    taken = []
    hook = model.model.layers[1].mod_aux_router.register_forward_hook(
        lambda module, args, out: taken.append((out.squeeze(-1) > 0.5).sum(-1)))
    try:
        with torch.no_grad():
            cache = getattr(model(tokens, use_cache=True), CACHE_FIELD)
    finally:
        hook.remove()
    layer = cache.layers[1]
    processed = [layer.processed_tokens(row) for row in range(tokens.shape[0])]
    assert processed == taken[0].tolist()
    assert 0 < sum(processed) < tokens.numel()
    assert cache.layers[0].keys.shape[-2] == tokens.shape[1] == cache.get_seq_length()


@pytest.mark.parametrize("name", ["dense", "moma+mod", "mot+mod"])
def test_left_padding_gives_the_logits_and_generation_of_the_unpadded_sequence(name):
    model = hf_model(name)
    tokens = megatron_runs()[name].tokens
    pad = 4
    short = tokens[2:3, pad:]  # an image, then text
    padded = torch.cat([tokens[:1], torch.cat([torch.full((1, pad), VOCABULARY.eod), short], 1)])
    mask = torch.ones_like(padded)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(padded, attention_mask=mask, position_ids=positions).logits
        alone = model(short).logits
    torch.testing.assert_close(batched[1, pad:], alone[0], atol=LOGITS_ATOL, rtol=0)
    options = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=VOCABULARY.eod)
    together = model.generate(padded, attention_mask=mask, **options)
    assert torch.equal(together[1, pad:], model.generate(short, **options)[0])


@pytest.mark.parametrize("name", ["moma", "mot+mod"])
def test_loss_with_labels_equals_megatron_mean_next_token_loss(name):
    run = megatron_runs()[name]
    with torch.no_grad():
        loss = hf_model(name)(run.tokens, labels=run.tokens).loss
    torch.testing.assert_close(loss, run.losses.mean(), atol=1e-5, rtol=0)


def test_inputs_embeds_are_refused():
    model = hf_model("dense")
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 2, 32))


def test_exported_model_files_import_only_the_standard_library_torch_and_transformers(tmp_path):
    """The remote code ships alone: every import in the exported files (at any depth) is the
    standard library, torch, transformers or a sibling file, and importing them in a fresh
    process loads no megatron module."""
    import ast
    import subprocess
    import sys

    from megatron_moma.hf.mapping import HF_MODEL_FILES

    siblings = {os.path.splitext(os.path.basename(path))[0] for path in HF_MODEL_FILES}
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "__future__"}
    package = tmp_path / "exported"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path in HF_MODEL_FILES:
        tree = ast.parse(open(path).read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only a sibling file of the export
                    assert node.module in siblings, (path, node.lineno, node.module)
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, (path, node.lineno, name)
        shutil.copy(path, package)
    probe = ("import sys; import exported.modeling_moma, exported.configuration_moma; "
             "print([m for m in sys.modules if m.split('.')[0] in ('megatron', 'megatron_moma')])")
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"
