"""The pipeline's diffusers-style LoRA API on a tiny random pipeline: several adapters, weights, exact fusing,
lossless saving, the training export format, and every bad input.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_lora.py -q
"""

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_model
from unibrain_hf import UniBrainForConditionalGeneration, UniBrainPipeline, UniBrainProcessor
from unibrain_hf.errors import CorruptFileError, InputFileNotFoundError, InvalidInputError, UnsafeFileError
from unibrain_hf.modeling.vae import tiny_vae
from unibrain_hf.pipelines.components import flow_match_scheduler
from unibrain_hf.train.lora import apply_lora

IMAGE = np.random.default_rng(0).normal(100, 30, size=(30, 40)).astype(np.float32)


def run(pipe) -> torch.Tensor:
    """The user's path: one generation call, its latent grid (deterministic for a fixed generator)."""
    return pipe(images={"t1n": IMAGE}, target_modalities=["t2w"], num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images["t2w"][0]


def plain_weights(model) -> dict:
    """The model's base weights under their plain names, whether or not LoRA layers are injected."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k}


@pytest.fixture(scope="module")
def base_dir(converted_fixture, tmp_path_factory):
    """A tiny random pipeline, saved once; each test loads its own copy (adapters change the model in place)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted_fixture / "tokenizer"))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                         "<|vision_end|>")]
    model = tiny_model(vocab_size=len(tokenizer) + 9, bos_token_id=ids[0], eos_token_id=ids[1],
                       start_of_image_token_id=ids[2], end_of_image_token_id=ids[3])
    with torch.no_grad():  # a stronger velocity head, so that adapters visibly move the generated latents
        model.llm2vae.weight.normal_(0, 0.2)
    processor = UniBrainProcessor.for_model(model.config, tokenizer, vae_max_size=64, vae_min_size=32,
                                            vit_max_size=56, vit_min_size=28)
    pipe = UniBrainPipeline(model=model, vae=tiny_vae(), scheduler=flow_match_scheduler(), tokenizer=tokenizer,
                            processor=processor)
    directory = tmp_path_factory.mktemp("lora") / "base"
    pipe.save_pretrained(directory)
    return directory


def load_pipe(directory):
    pipe = UniBrainPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(base_dir):
    return load_pipe(base_dir)


def export_like_training(base_dir, directory, preset, rank, alpha, seed, model=None):
    """What training writes: ``apply_lora`` on the model (a PeftModel), trained factors, ``save_pretrained``."""
    model = model if model is not None else UniBrainForConditionalGeneration.from_pretrained(base_dir / "model")
    peft_model = apply_lora(model, preset, rank=rank, alpha=alpha, dropout=0.1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: lora_B starts at zero, which would make the adapter a no-op
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"und": export_like_training(base_dir, root / "und", "und", rank=4, alpha=8, seed=1),
            "both": export_like_training(base_dir, root / "both", "both", rank=2, alpha=4, seed=2)}


@pytest.fixture(scope="module")
def base_output(base_dir):
    return run(load_pipe(base_dir))


def manual_merge(base_dir, parts) -> UniBrainPipeline:
    """A pipeline whose base weights get ``Σ weight · alpha/r · B @ A`` added by hand, in float64, from the files."""
    model = UniBrainForConditionalGeneration.from_pretrained(base_dir / "model")
    parameters = dict(model.named_parameters())
    for directory, weight in parts:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(directory / "adapter_model.safetensors")
        for key, lora_a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                lora_b = tensors[key.replace("lora_A", "lora_B")]
                delta = weight * config["lora_alpha"] / config["r"] * (lora_b.double() @ lora_a.double())
                with torch.no_grad():
                    parameters[f"{module}.weight"].add_(delta.float())
    pipe = UniBrainPipeline.from_pretrained(base_dir, model=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def no_lora_layers(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")


# ------------------------------------------------------------------------------------------ the training format
def test_training_export_loads_like_peft_and_changes_outputs(pipe, base_dir, adapters, base_output):
    from peft import PeftModel

    pipe.load_lora_weights(adapters["both"], adapter_name="mine")
    assert type(pipe.model) is UniBrainForConditionalGeneration  # still the model class, not a PeftModel
    adapted = run(pipe)
    assert (adapted - base_output).abs().max() > 1e-2
    # peft's own reading of the same directory, folded in with merge_and_unload: the same outputs.
    reference = PeftModel.from_pretrained(UniBrainForConditionalGeneration.from_pretrained(base_dir / "model"),
                                          str(adapters["both"])).merge_and_unload()
    reference_pipe = UniBrainPipeline.from_pretrained(base_dir, model=reference)
    reference_pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(adapted, run(reference_pipe), atol=1e-5, rtol=0)


def test_save_lora_weights_writes_the_training_format(pipe, base_dir, adapters, tmp_path):
    from peft import PeftModel

    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    out = pipe.save_lora_weights(tmp_path / "und_again", adapter_name="und")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (json.loads((out / "adapter_config.json").read_text())
            == json.loads((adapters["und"] / "adapter_config.json").read_text()))
    original = load_file(adapters["und"] / "adapter_model.safetensors")
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert all(k.startswith("base_model.model.") for k in saved)
    PeftModel.from_pretrained(UniBrainForConditionalGeneration.from_pretrained(base_dir / "model"),
                              str(out))  # peft itself reads it
    assert pipe.save_lora_weights(tmp_path / "active").exists()  # one active adapter: that one
    pipe.set_adapters(["und", "both"])
    with pytest.raises(InvalidInputError, match="several adapters"):
        pipe.save_lora_weights(tmp_path / "which")


# ------------------------------------------------------------------------------------------ several adapters
def test_two_adapters_weighted_equal_a_manual_merge(pipe, base_dir, adapters, base_output):
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    assert pipe.get_list_adapters() == {"model": ["und", "both"]}
    assert pipe.get_active_adapters() == ["both"]  # diffusers: the last loaded adapter is the active one
    torch.testing.assert_close(run(pipe), run(manual_merge(base_dir, [(adapters["both"], 1.0)])), atol=1e-5, rtol=0)

    pipe.set_adapters(["und", "both"], adapter_weights=[0.5, 1.5])
    assert pipe.get_active_adapters() == ["und", "both"]
    weighted = run(pipe)
    expected = run(manual_merge(base_dir, [(adapters["und"], 0.5), (adapters["both"], 1.5)]))
    torch.testing.assert_close(weighted, expected, atol=1e-5, rtol=0)
    pipe.set_adapters(["und", "both"])  # default weights 1.0: a different output
    assert (run(pipe) - weighted).abs().max() > 1e-3
    pipe.set_adapters("und", 0.0)
    torch.testing.assert_close(run(pipe), base_output, atol=1e-6, rtol=0)


def test_disable_enable_delete(pipe, base_dir, adapters, base_output):
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    pipe.set_adapters(["und", "both"], [0.7, 1.2])
    adapted = run(pipe)
    pipe.disable_lora()
    assert torch.equal(run(pipe), base_output)
    pipe.enable_lora()
    assert torch.equal(run(pipe), adapted)

    pipe.delete_adapters("both")
    assert pipe.get_list_adapters() == {"model": ["und"]} and pipe.get_active_adapters() == ["und"]
    names = [n for n, _ in pipe.model.named_parameters() if "lora_" in n]
    assert names and not any(".gen." in n for n in names)  # layers only "both" adapted are plain linear again
    pipe.set_adapters("und", 0.7)
    torch.testing.assert_close(run(pipe), run(manual_merge(base_dir, [(adapters["und"], 0.7)])), atol=1e-5, rtol=0)
    pipe.delete_adapters(["und"])
    assert pipe.get_list_adapters() == {} and no_lora_layers(pipe.model)
    assert torch.equal(run(pipe), base_output)


# ------------------------------------------------------------------------------------------ fusing
def test_fuse_unfuse_restores_the_base_weights_bit_for_bit(pipe, adapters, base_output):
    before = plain_weights(pipe.model)
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    pipe.set_adapters(["und", "both"], [0.5, 1.5])
    adapted = run(pipe)

    # peft's subtraction alone does not give the base weights back; that is what this test guards against.
    naive = copy.deepcopy(pipe.model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in naive.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            module.unmerge()
    assert any(not torch.equal(before[k], v) for k, v in plain_weights(naive).items())

    pipe.fuse_lora()
    assert pipe.fused_loras == {"und", "both"} and pipe.num_fused_loras == 2
    torch.testing.assert_close(run(pipe), adapted, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    after = plain_weights(pipe.model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(pipe), adapted)
    pipe.disable_lora()
    assert torch.equal(run(pipe), base_output)


def test_fuse_unfuse_exact_in_bfloat16(pipe, adapters):
    """The GPU dtype: bf16 rounding makes peft's subtraction drift much more; the base still comes back exactly."""
    pipe.model.to(torch.bfloat16)
    before = plain_weights(pipe.model)
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    pipe.set_adapters(["und", "both"], [0.9, 1.1])
    pipe.fuse_lora(lora_scale=0.7)
    assert any(not torch.equal(before[k], v) for k, v in plain_weights(pipe.model).items())
    pipe.unfuse_lora()
    after = plain_weights(pipe.model)
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]) for k in before)


def test_fuse_with_scale_and_subset_then_unload_bakes_it_in(pipe, base_dir, adapters):
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    pipe.set_adapters(["und"], [0.8])
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["und"])
    expected = run(manual_merge(base_dir, [(adapters["und"], 0.4)]))
    torch.testing.assert_close(run(pipe), expected, atol=1e-5, rtol=0)
    fused_und = run(pipe)
    pipe.set_adapters("both", 1e30)  # finite numbers, but the fused weights overflow: safe_fusing refuses them
    with pytest.raises(InvalidInputError, match=r"safe_fusing=True.*'both'\] gives NaN/Inf"):
        pipe.fuse_lora(lora_scale=1e30, adapter_names=["both"], safe_fusing=True)
    pipe.set_adapters("und", 0.8)  # "both" at 1e30 unfused would overflow too; back to the state before
    assert pipe.fused_loras == {"und"} and torch.equal(run(pipe), fused_und)
    pipe.unload_lora_weights()  # diffusers' recipe: fuse, unload, then the base weights carry the adapter
    assert no_lora_layers(pipe.model) and pipe.fused_loras == set()
    torch.testing.assert_close(run(pipe), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ saving the pipeline
def test_save_with_adapters_attached_reloads_losslessly(pipe, base_dir, adapters, tmp_path):
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    pipe.set_adapters(["und", "both"], [0.3, 1.2])
    adapted = run(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    assert torch.equal(run(pipe), adapted)  # the in-memory pipeline is unchanged by saving

    # model/ is the plain base model; the adapters sit beside it.
    saved = load_file(tmp_path / "saved" / "model" / "model.safetensors")
    base = load_file(base_dir / "model" / "model.safetensors")
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    assert sorted(p.name for p in (tmp_path / "saved" / "lora").iterdir()) == ["adapters.json", "both", "und"]

    reloaded = load_pipe(tmp_path / "saved")
    assert reloaded.get_list_adapters() == {"model": ["und", "both"]}
    assert reloaded.get_active_adapters() == ["und", "both"]
    assert torch.equal(run(reloaded), adapted)


def test_save_fused_or_disabled_reloads_in_that_state(pipe, base_dir, adapters, base_output, tmp_path):
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    pipe.fuse_lora(lora_scale=0.8)
    fused = run(pipe)
    pipe.save_pretrained(tmp_path / "fused")
    assert torch.equal(run(pipe), fused) and pipe.fused_loras == {"both"}
    base = load_file(base_dir / "model" / "model.safetensors")
    saved = load_file(tmp_path / "fused" / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], base[k]) for k in base)  # unfused exactly for the write

    reloaded = load_pipe(tmp_path / "fused")
    assert reloaded.fused_loras == {"both"} and torch.equal(run(reloaded), fused)
    reloaded.unfuse_lora()
    reloaded.disable_lora()
    assert torch.equal(run(reloaded), base_output)
    reloaded.save_pretrained(tmp_path / "disabled")
    again = load_pipe(tmp_path / "disabled")
    assert again.get_list_adapters() == {"model": ["both"]} and torch.equal(run(again), base_output)
    again.enable_lora()
    assert (run(again) - base_output).abs().max() > 1e-2


def test_saving_without_adapters_removes_a_stale_lora_folder(pipe, adapters, tmp_path):
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    pipe.save_pretrained(tmp_path / "out")
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "lora").exists()
    assert load_pipe(tmp_path / "out").get_list_adapters() == {}


def test_diffusers_loader_hook_restores_adapters(base_dir, adapters, tmp_path):
    """``DiffusionPipeline.from_pretrained`` builds the class, then records ``_name_or_path``: that restores too."""
    source = load_pipe(base_dir)
    source.load_lora_weights(adapters["und"], adapter_name="und")
    source.save_pretrained(tmp_path / "saved")
    fresh = load_pipe(base_dir)
    rebuilt = UniBrainPipeline(**fresh.components)
    rebuilt.set_progress_bar_config(disable=True)
    rebuilt.register_to_config(_name_or_path=str(tmp_path / "saved"))
    assert rebuilt.get_list_adapters() == {"model": ["und"]} and torch.equal(run(rebuilt), run(source))


# ------------------------------------------------------------------------------------------ other file layouts
def test_single_safetensors_files(pipe, adapters, tmp_path):
    pipe.load_lora_weights(adapters["und"], adapter_name="dir")
    reference = run(pipe)
    tensors = load_file(adapters["und"] / "adapter_model.safetensors")
    config = json.loads((adapters["und"] / "adapter_config.json").read_text())

    # diffusers' pipeline layout: component prefix "model.", the config packed into the header.
    diffusers_dir = tmp_path / "diffusers"
    diffusers_dir.mkdir()
    header = {f"model.{k}": v for k, v in config.items()}
    save_file({"model." + k.removeprefix("base_model.model."): v for k, v in tensors.items()},
              str(diffusers_dir / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    pipe.load_lora_weights(diffusers_dir, adapter_name="diffusers")
    assert torch.equal(run(pipe), reference)

    # a bare peft-layout file without any config: ranks from the shapes, alpha = rank (scale 1, diffusers' rule);
    # this adapter has alpha/r = 2, so the bare file equals the directory at weight 0.5.
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    pipe.load_lora_weights(bare, adapter_name="bare")
    pipe.set_adapters("dir", 0.5)
    half = run(pipe)
    pipe.set_adapters("bare")
    torch.testing.assert_close(run(pipe), half, atol=1e-6, rtol=0)

    # weight_name picks a file inside a directory; a state dict in memory works too.
    pipe.load_lora_weights(adapters["und"], weight_name="adapter_model.safetensors", adapter_name="named")
    pipe.load_lora_weights(tensors, adapter_name="in_memory", metadata=config)
    pipe.set_adapters("in_memory")
    assert torch.equal(run(pipe), reference)


def test_hub_repositories(base_dir, adapters, tmp_path):
    """Hub ids go through huggingface_hub; offline (as in the tests) it serves them from its cache."""
    import shutil

    cache = tmp_path / "hub"

    def cached_repo(repo_id, source):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        shutil.copytree(source, repo / "snapshots" / ("0" * 40))

    cached_repo("someone/unibrain-lora", adapters["und"])
    pipe = load_pipe(base_dir)
    pipe.load_lora_weights("someone/unibrain-lora", cache_dir=cache, adapter_name="hub")
    adapted = run(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    cached_repo("someone/unibrain-pipeline", tmp_path / "saved")
    reloaded = UniBrainPipeline.from_pretrained("someone/unibrain-pipeline", cache_dir=cache)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.get_list_adapters() == {"model": ["hub"]} and torch.equal(run(reloaded), adapted)


# ------------------------------------------------------------------------------------------ bad inputs
def assert_untouched(pipe, base_output):
    assert no_lora_layers(pipe.model) and torch.equal(run(pipe), base_output)


def test_unknown_adapter_names_are_named(pipe, adapters):
    with pytest.raises(InvalidInputError, match="no LoRA adapter is loaded"):
        pipe.set_adapters("und")
    pipe.load_lora_weights(adapters["und"], adapter_name="und")
    with pytest.raises(InvalidInputError, match=r"\['styel'\] are not loaded; loaded adapters: \['und'\]"):
        pipe.set_adapters(["und", "styel"])
    pipe.load_lora_weights(adapters["both"], adapter_name="both")
    with pytest.raises(InvalidInputError, match="2 adapter names .* 1 adapter_weights"):
        pipe.set_adapters(["und", "both"], [0.5])
    with pytest.raises(InvalidInputError, match="weight of adapter 'und' must be a finite number"):
        pipe.set_adapters("und", float("nan"))
    with pytest.raises(InvalidInputError, match=r"\['gone'\] are not loaded"):
        pipe.delete_adapters("gone")
    with pytest.raises(InvalidInputError, match="fuse_lora.*'nope'"):
        pipe.fuse_lora(adapter_names=["nope"])
    with pytest.raises(InvalidInputError, match="'und' is already loaded"):
        pipe.load_lora_weights(adapters["und"], adapter_name="und")
    with pytest.raises(InvalidInputError, match="adapter_name 'my.style'"):
        pipe.load_lora_weights(adapters["und"], adapter_name="my.style")
    with pytest.raises(InvalidInputError, match="components must be"):
        pipe.fuse_lora(0.5)
    pipe.fuse_lora()
    with pytest.raises(InvalidInputError, match="fused into the weights; call pipe.unfuse_lora"):
        pipe.disable_lora()
    with pytest.raises(InvalidInputError, match="fused into the weights; call pipe.unfuse_lora"):
        pipe.delete_adapters("both")


def test_adapter_for_another_model_is_refused_by_name(pipe, base_dir, adapters, base_output, tmp_path):
    # Keys naming modules this model does not have (a FLUX-style adapter).
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(foreign / "pytorch_lora_weights.safetensors"))
    with pytest.raises(InvalidInputError, match=r"pytorch_lora_weights.safetensors: none of the 1 modules .*"
                                                r"transformer_blocks.0.attn.to_q"):
        pipe.load_lora_weights(foreign)

    # A config whose target_modules match nothing, next to valid weights.
    retargeted = copy_adapter(adapters["und"], tmp_path / "retargeted", target_modules=["to_q", "to_k"])
    with pytest.raises(InvalidInputError, match=r"adapter_config.json: target_modules .*to_q.* match no module"):
        pipe.load_lora_weights(retargeted)

    # A config claiming another rank than the weights have: found after the layers were made, so they are undone,
    # and an adapter loaded before keeps its place, weight and output.
    pipe.load_lora_weights(adapters["both"], adapter_name="kept", low_cpu_mem_usage=True)
    pipe.set_adapters("kept", 0.5)
    kept = run(pipe)
    torch.testing.assert_close(kept, run(manual_merge(base_dir, [(adapters["both"], 0.5)])), atol=1e-5, rtol=0)
    rank = copy_adapter(adapters["und"], tmp_path / "rank", r=8)
    with pytest.raises(InvalidInputError, match=r"adapter_model.safetensors: .* do not fit this model .*lora_A"):
        pipe.load_lora_weights(rank)
    assert pipe.get_list_adapters() == {"model": ["kept"]} and pipe.get_active_adapters() == ["kept"]
    assert torch.equal(run(pipe), kept)
    pipe.unload_lora_weights()

    # Factors made for a model with another hidden size.
    wider = copy_adapter(adapters["und"], tmp_path / "wider")
    tensors = load_file(wider / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 32) if "lora_A" in k else torch.zeros(v.shape[0] + 32,
                                                                                             v.shape[1])
               for k, v in tensors.items()}, str(wider / "adapter_model.safetensors"))
    with pytest.raises(InvalidInputError, match=r"wider/adapter_model.safetensors: .* do not fit this model"):
        pipe.load_lora_weights(wider)

    # Half an adapter: a lora_B without its lora_A.
    tensors = load_file(adapters["und"] / "adapter_model.safetensors")
    lone = next(k for k in tensors if "lora_A" in k)
    save_file({k: v for k, v in tensors.items() if k != lone}, str(tmp_path / "half.safetensors"))
    with pytest.raises(InvalidInputError, match=r"half.safetensors: 1 LoRA factors are missing"):
        pipe.load_lora_weights(tmp_path / "half.safetensors")

    # Non-finite factors.
    tensors = load_file(adapters["und"] / "adapter_model.safetensors")
    first = next(iter(tensors))
    save_file({**tensors, first: torch.full_like(tensors[first], float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(InvalidInputError, match=r"nan.safetensors: .* contain NaN or Inf"):
        pipe.load_lora_weights(tmp_path / "nan.safetensors")

    # Keys that are not LoRA factors (e.g. a DoRA magnitude vector).
    tensors = load_file(adapters["und"] / "adapter_model.safetensors")
    key = next(iter(tensors)).replace("lora_A.weight", "lora_magnitude_vector")
    save_file({**tensors, key: torch.ones(64)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(InvalidInputError, match=r"dora.safetensors: key .*lora_magnitude_vector"):
        pipe.load_lora_weights(tmp_path / "dora.safetensors")
    assert_untouched(pipe, base_output)


def copy_adapter(source, destination, **config_changes):
    destination.mkdir()
    config = {**json.loads((source / "adapter_config.json").read_text()), **config_changes}
    (destination / "adapter_config.json").write_text(json.dumps(config))
    (destination / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    return destination


class _Trap:
    """Unpickling this creates a file: proof that a pickle was opened."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_and_broken_adapter_files_are_refused(pipe, adapters, base_output, tmp_path):
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters["und"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UnsafeFileError, match="pickled"):
        pipe.load_lora_weights(pickled)
    with pytest.raises(UnsafeFileError, match="adapter_model.bin are a pickle file"):
        pipe.load_lora_weights(pickled / "adapter_model.bin")
    with pytest.raises(UnsafeFileError, match="use_safetensors=False"):
        pipe.load_lora_weights(adapters["und"], use_safetensors=False)
    assert not marker.exists()

    broken = copy_adapter(adapters["und"], tmp_path / "broken")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"broken/adapter_model.safetensors"):
        pipe.load_lora_weights(broken)
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "adapter_config.json").write_text("{not json")
    (tmp_path / "bad_config" / "adapter_model.safetensors").write_bytes(
        (adapters["und"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CorruptFileError, match=r"bad_config/adapter_config.json"):
        pipe.load_lora_weights(tmp_path / "bad_config")
    not_lora = copy_adapter(adapters["und"], tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(InvalidInputError, match="peft_type is 'IA3'; only LoRA"):
        pipe.load_lora_weights(not_lora)
    with pytest.raises(InputFileNotFoundError, match="does-not-exist"):
        pipe.load_lora_weights(tmp_path / "does-not-exist")
    with pytest.raises(InputFileNotFoundError, match="'someone/unibrain-lora'"):
        pipe.load_lora_weights("someone/unibrain-lora")  # offline in the tests: named, not a traceback from the Hub
    with pytest.raises(InvalidInputError, match="unknown arguments"):
        pipe.load_lora_weights(adapters["und"], adpater_name="x")
    assert_untouched(pipe, base_output)


# ------------------------------------------------------------------------------------------ the earlier API
def test_deprecated_load_lora_still_works(pipe, adapters, base_output):
    with pytest.warns(FutureWarning, match="load_lora_weights"):
        pipe.load_lora(adapters["both"])
    adapted = run(pipe)
    assert pipe.get_list_adapters() == {"model": ["default"]} and (adapted - base_output).abs().max() > 1e-2
    with pytest.warns(FutureWarning, match="unload_lora_weights"):
        pipe.unload_lora()
    assert_untouched(pipe, base_output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe.load_lora(adapters["both"], merge=True)
    assert no_lora_layers(pipe.model)
    torch.testing.assert_close(run(pipe), adapted, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ the documentation
def test_docs_snippets_run(base_dir, adapters, tmp_path, monkeypatch):
    """Every ```python block of docs/LORA.md, in order, against the paths the doc names (tiny stand-ins)."""
    import re
    import shutil
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "LORA.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    shutil.copytree(base_dir, tmp_path / "runs" / "tiny" / "unified" / "pipeline")
    shutil.copytree(adapters["both"], tmp_path / "runs" / "private" / "lora" / "lora_adapter")
    shutil.copytree(adapters["und"], tmp_path / "runs" / "site_b" / "lora" / "lora_adapter")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/LORA.md", "exec"), namespace)
    assert not np.array_equal(namespace["mixed"], namespace["base"])
    np.testing.assert_allclose(namespace["fused"], namespace["mixed"], atol=1 / 255)
    assert (tmp_path / "runs" / "exported" / "site_b" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "private" / "merged" / "model_index.json").exists()
