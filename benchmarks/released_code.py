"""Run the whole pipeline on a model family's own released code, at a tiny width with random weights.

The released LLaDA / LLaDA-MoE / Dream / RND1 checkpoints cannot be downloaded here, and their code is not ours to
ship; tests use stand-ins (tests/remote_code). Given a folder holding a family's released Python files (LLaDA:
modeling_llada.py, configuration_llada.py; LLaDA-MoE: modeling_lladamoe.py, configuration_lladamoe.py; Dream:
modeling_dream.py, configuration_dream.py, generation_utils.py; RND1: modeling_rnd.py, configuration_rnd.py,
generation_utils.py, generation_config.py, sampling.py, terminal_visualizer.py; for instance copied from a hub
snapshot), this writes a checkpoint of two layers of width 32 around those files (config.json with `auto_map`,
generation_config.json, random weights named as the code names them, a tokenizer), then runs what a user runs
through the CLI: `sample` with each sampler, batch 1 against batch 8, `trajectories`, `train-adjust`, `sample`
with the head, and `eval`. For RND1, and for LLaDA given its GitHub repository's generate.py (`--generate-file`),
the family's own sampler is then run against jointdlm's, greedy, token for token. It prints one line per stage and
stops at the first failure.

    python benchmarks/released_code.py --family dream --code DIR --workdir runs/released/dream

The tokenizer is ours and declares its mask token, so the mask-id lookup of an undeclared mask (LLaDA-MoE) is
tested on the stand-ins (tests/test_remote_code.py), not here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from jointdlm.models.tokenizer import BPETokenizer

WIDTH, HEADS, LAYERS, MLP, LENGTH = 32, 4, 2, 64, 64
LINES = ["the cat sat on the mat", "a dog ran to the park", "birds sing in the morning"] * 20
PROMPTS = ["the cat", "a", "birds sing in the", "the dog ran", "a cat", "the", "sing in", "a dog ran to"]
FILES = {"llada": ("modeling_llada.py", "configuration_llada.py"),
         "lladamoe": ("modeling_lladamoe.py", "configuration_lladamoe.py"),
         "dream": ("modeling_dream.py", "configuration_dream.py", "generation_utils.py"),
         "rnd1": ("modeling_rnd.py", "configuration_rnd.py", "generation_utils.py", "generation_config.py",
                  "sampling.py", "terminal_visualizer.py")}
SHARPEN = 8.0  # own_sampler_agreement's LM-head scale
MODULES = {"llada": "llada", "lladamoe": "lladamoe", "dream": "dream", "rnd1": "rnd"}
# RND1's configuration writes the released 30B shape over every config it builds (`set_config_defaults`, from
# its CONFIG_DEFAULTS table): the one change made to a released file is a line appended to the copy that shrinks
# that table's sizes (and its out-of-vocabulary special ids) to the tiny checkpoint's.
RND1_TINY = {"hidden_size": WIDTH, "num_attention_heads": HEADS, "num_key_value_heads": HEADS // 2,
             "head_dim": WIDTH // HEADS, "num_hidden_layers": LAYERS, "max_window_layers": LAYERS,
             "intermediate_size": MLP, "moe_intermediate_size": MLP // 2, "num_experts": 4, "num_experts_per_tok": 2,
             "max_position_embeddings": LENGTH}


def family_config(family: str, vocab: int) -> dict:
    if family == "llada":
        return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": WIDTH, "n_heads": HEADS,
                "n_kv_heads": HEADS, "n_layers": LAYERS, "mlp_hidden_size": MLP, "mlp_ratio": 2,
                "vocab_size": vocab, "embedding_size": vocab, "max_sequence_length": LENGTH, "rope": True,
                "rope_theta": 10000.0, "weight_tying": False, "use_cache": False, "block_type": "llama",
                "activation_type": "silu", "layer_norm_type": "rms", "rms_norm_eps": 1e-5, "include_bias": False,
                "include_qkv_bias": False, "attention_layer_norm": False, "flash_attention": False, "alibi": False,
                "scale_logits": False, "input_emb_norm": False, "init_fn": "mitchell", "init_device": "cpu",
                "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                             "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                             "AutoModel": "modeling_llada.LLaDAModelLM"}}
    if family == "lladamoe":
        # LLaDA-MoE's config.json says model_type "llada" (its own LLaDAConfig) and names LLaDAMoEModelLM.
        return {"model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "hidden_size": WIDTH,
                "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "num_hidden_layers": LAYERS,
                "dense_intermediate_size": MLP, "expert_intermediate_size": MLP // 2,
                "shared_expert_intermediate_size": None, "num_experts": 4, "num_experts_per_tok": 2,
                "moe_layer_freq": [1] * LAYERS, "moe_router_enable_expert_bias": False,
                "moe_router_score_function": "softmax", "norm_topk_prob": False, "qk_layernorm": True,
                "vocab_size": vocab, "max_position_embeddings": LENGTH, "rope_theta": 10000.0,
                "partial_rotary_factor": 1.0, "rope_scaling": None, "tie_word_embeddings": False,
                "hidden_act": "silu", "rms_norm_eps": 1e-5, "use_cache": False,
                "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                             "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                             "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"}}
    if family == "rnd1":
        return {"model_type": "rnd1", "architectures": ["RND1LM"], "vocab_size": vocab, "moe_backend": "hf",
                "auto_map": {"AutoConfig": "configuration_rnd.RND1Config", "AutoModel": "modeling_rnd.RND1Model",
                             "AutoModelForMaskedLM": "modeling_rnd.RND1LM"}}
    return {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": WIDTH,
            "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "num_hidden_layers": LAYERS,
            "intermediate_size": MLP, "vocab_size": vocab, "max_position_embeddings": LENGTH, "rope_theta": 10000.0,
            "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}}


def copy_code(family: str, code: Path, target: Path, ids: dict[str, int], vocab: int) -> None:
    """The family's released files into `target`, RND1's configuration with its size table shrunk."""
    for name in FILES[family]:
        shutil.copy(code / name, target / name)
    if family == "rnd1":
        tiny = {**RND1_TINY, "vocab_size": vocab, "eos_token_id": ids["eos_token_id"],
                "pad_token_id": ids["pad_token_id"]}
        with open(target / "configuration_rnd.py", "a") as file:
            file.write(f"\nCONFIG_DEFAULTS.update({tiny!r})  # released_code.py: the tiny checkpoint's shape\n")


def weight_shapes(family: str, code: Path, config: dict, ids: dict[str, int]) -> dict[str, torch.Size]:
    """Names and shapes of the weights, from the released classes themselves (imported as a package)."""
    from jointdlm.models.hf import _default_rope_available, legacy_rope

    module = MODULES[family]
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / f"released_{family}"
        package.mkdir()
        copy_code(family, code, package, ids, config["vocab_size"])
        (package / "__init__.py").write_text("")
        sys.path.insert(0, tmp)
        try:
            try:
                configuration = importlib.import_module(f"released_{family}.configuration_{module}")
                modeling = importlib.import_module(f"released_{family}.modeling_{module}")
            except ImportError as err:  # RND1's code needs transformers' Qwen3-MoE modules (4.51 and later)
                raise SystemExit(f"released_code: the {family} code does not import under transformers "
                                 f"{transformers.__version__}: {err}") from None
            fields = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
            if family == "llada":
                inner = modeling.LLaDAModel(modeling.create_model_config_from_pretrained_config(
                    configuration.LLaDAConfig(**fields)), init_params=False)
                return {"model." + k: v.shape for k, v in inner.state_dict().items()}
            with _default_rope_available():
                if family == "lladamoe":
                    model = modeling.LLaDAMoEModelLM(configuration.LLaDAConfig(**fields))
                elif family == "rnd1":
                    rnd1_config = configuration.RND1Config(**fields)
                    legacy_rope(rnd1_config)  # as the loader does: 5.x needs rope_parameters
                    model = modeling.RND1LM(rnd1_config)
                else:
                    model = modeling.DreamModel(configuration.DreamConfig(**fields))
            return {k: v.shape for k, v in model.state_dict().items() if "inv_freq" not in k}
        finally:
            sys.path.remove(tmp)


def write_checkpoint(family: str, code: Path, target: Path, overrides: dict | None = None) -> Path:
    missing = [name for name in FILES[family] if not (code / name).is_file()]
    if missing:
        raise SystemExit(f"released_code: {code} lacks {', '.join(missing)}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    bpe = target.parent / "bpe"
    bpe.mkdir(exist_ok=True)
    BPETokenizer.train(LINES, vocab_size=300).save(bpe)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(bpe / "tokenizer.json"), pad_token="<pad>", bos_token="<bos>",
        eos_token="<eos>", mask_token="<mask>")
    tokenizer.save_pretrained(target)
    ids = {"mask_token_id": tokenizer.mask_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    copy_code(family, code, target, ids, len(tokenizer))
    config = {**family_config(family, len(tokenizer)), **ids, **(overrides or {})}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    (target / "generation_config.json").write_text(json.dumps(ids, indent=2))
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in weight_shapes(family, code, config, ids).items():
        if name.endswith("norm.weight") or ".ln_f." in name:
            state[name] = torch.ones(shape)
        elif len(shape) == 2:
            state[name] = torch.randn(*shape, generator=generator) / shape[1] ** 0.5
        else:
            state[name] = 0.1 * torch.randn(*shape, generator=generator)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def run(stage: str, argv: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "jointdlm.cli", *argv], capture_output=True, text=True)
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    if done.returncode != 0:
        raise SystemExit(f"{stage}: FAILED\n  " + "\n  ".join(lines[-3:]))
    summary = next((line for line in reversed(lines) if "->" in line or "steps," in line), lines[-1] if lines else "")
    print(f"{stage}: ok  {summary.strip()[:150]}", flush=True)
    return summary


def own_sampler_agreement(family: str, model_dir: str, prompts: list[str], generate_file: Path | None,
                          length: int = 16, head_as_is: bool = False) -> None:
    """The family's own sampler against jointdlm's, greedy, token for token on the same canvases (the prompt after
    the start token jointdlm puts first): RND1's `sampling.diffusion_sample` (shipped with its code; one token per
    step, lowest entropy first) against `sequential --rule entropy`; LLaDA's `generate.py` (from its GitHub
    repository, `--generate-file`; lowest confidence remasked) against `sequential`, `parallel` at K=2 and
    `sequential` in semi-autoregressive blocks of 8."""
    from jointdlm.models.loading import load_model
    from jointdlm.sampling.base import TokenChoice
    from jointdlm.sampling.loop import SamplingConfig, encode_prompts, generate
    from jointdlm.sampling.registry import make_sampler

    model = load_model(model_dir, trust_remote_code=True, dtype="float32")
    # jointdlm never writes the mask id (nor a BOS that is not EOS) and takes them out of the distribution; the
    # released samplers keep them, and LLaDA's writes the mask id when it is the argmax, which at random weights
    # it sometimes is. At random weights every entropy and confidence is also within a hair of the others, so the
    # order turns on those two ids (`--head-as-is`: RND1 5 of 8 prompts identical, LLaDA at K=2 7 of 8, LLaDA-MoE
    # 7 of 8; docs/results.md §8). So, as in a trained model: a sharper LM head (each position an entropy and a
    # confidence of its own), and no mass on those ids (their rows zeroed: logit 0 among logits of scale ~20).
    if not head_as_is:  # `--head-as-is` measures what the sentence above says
        with torch.no_grad():
            weight = model.model.get_output_embeddings().weight
            weight.mul_(SHARPEN)
            weight[model.spec.never_sampled()] = 0.0
    prefixes = encode_prompts(model, prompts)
    spec = model.spec
    if family == "rnd1":
        own = importlib.import_module(type(model.model).__module__.rsplit(".", 1)[0] + ".sampling").diffusion_sample
        cases = [("sequential", 1, None, "entropy",
                  lambda prefix: own(model.model, seq_len=len(prefix) + length, num_steps=length, greedy=True,
                                     temperature=1.0, mask_token_id=spec.mask_id, prefix_ids=torch.tensor([prefix]),
                                     eos_token_id=None, pad_token_id=spec.pad_id))]
        name = "RND1's own sampler (sampling.diffusion_sample)"
    else:
        # Its forward reads config.use_cache when not given it (jointdlm passes it); transformers 5 drops that key
        # from a config as a generation setting, and LLaDA's generate.py then fails: give it back.
        if not hasattr(model.model.config, "use_cache"):
            model.model.config.use_cache = False
        found = importlib.util.spec_from_file_location("released_generate", generate_file)
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)

        def theirs(steps: int, block: int):
            return lambda prefix: module.generate(model.model, torch.tensor([prefix]), steps=steps, gen_length=length,
                                                  block_length=block, temperature=0.0, remasking="low_confidence",
                                                  mask_id=spec.mask_id)

        cases = [("sequential", 1, None, "confidence", theirs(length, length)),
                 ("parallel", 2, None, "confidence", theirs(length // 2, length)),
                 ("sequential", 1, length // 2, "confidence", theirs(length, length // 2))]
        name = f"LLaDA's generate.py ({generate_file.name}, on {family})"
    for sampler, k, block, rule, run_theirs in cases:
        config = SamplingConfig(length=length, tokens_per_step=k, block_length=block, progress=False,
                                choice=TokenChoice(rule=rule, temperature=0.0))
        ours = generate(model, make_sampler(sampler), config, prompts=prompts, prefixes=prefixes).tokens
        same = sum(run_theirs(prefix)[0, len(prefix):].tolist() == row
                   for prefix, row in zip(prefixes, ours, strict=True))
        setting = f"`{sampler}` K={k}{f', blocks of {block}' if block else ''}, greedy, --rule {rule}"
        print(f"{name} against {setting}: {same}/{len(prompts)} prompts identical", flush=True)
        if same != len(prompts):
            raise SystemExit("released_code: jointdlm and the family's own sampler disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FILES), required=True)
    parser.add_argument("--code", type=Path, required=True, help="folder with the family's released .py files")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config-set", action="append", default=[], metavar="KEY=JSON",
                        help="one more config.json entry (e.g. moe_router_enable_expert_bias=true); repeatable")
    parser.add_argument("--head-as-is", action="store_true",
                        help="the own-sampler check on the random LM head as written (not sharpened, banned ids "
                             "not zeroed): a diagnostic, expected to disagree on some prompts")
    parser.add_argument("--generate-file", type=Path, default=None,
                        help="LLaDA, LLaDA-MoE: the generate.py of LLaDA's GitHub repository (its `generate` takes the "
                             "mask id as an argument), to compare its sampler with ours")
    args = parser.parse_args()
    work = args.workdir
    overrides = {}
    for item in args.config_set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    model = str(write_checkpoint(args.family, args.code, work / "checkpoint", overrides))
    print(f"checkpoint: {model} (transformers {transformers.__version__})", flush=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # float32 whatever the config says: RND1's forces bfloat16, in which a left-padded row rounds differently from
    # the same row alone on a CPU, so batch 1 against batch 8 would test rounding, not the code.
    common = ["--model", model, "--trust-remote-code", "--dtype", "float32"]
    shape = ["--length", "12", "--prompts", str(prompts)]
    for spec, k in (("sequential", 1), ("parallel", 4), ("threshold", None), ("eb", None), ("punt", None)):
        schedule = [] if k is None else ["--tokens-per-step", str(k)]  # None: the sampler sizes its own steps
        run(f"sample {spec}", ["sample", *common, "--sampler", spec, *schedule, *shape,
                               "--batch-size", "8", "--out", str(work / f"{spec}.jsonl")])
    run("sample parallel, batch 1", ["sample", *common, "--sampler", "parallel", "--tokens-per-step", "4", *shape,
                                     "--batch-size", "1", "--out", str(work / "parallel_b1.jsonl")])
    same = (work / "parallel.jsonl").read_bytes() == (work / "parallel_b1.jsonl").read_bytes()
    print(f"batch 1 vs batch 8: {'identical' if same else 'DIFFERENT'}", flush=True)
    run("trajectories", ["trajectories", *common, "--out", str(work / "trajectories"), "--num", "64", *shape])
    run("train-adjust", ["train-adjust", *common, "--trajectories", str(work / "trajectories"),
                         "--out", str(work / "head"), "--max-steps", "60"])
    for spec in ("adjust", "adjust:threshold=0.9", "adjust:tau=0.9"):
        run(f"sample {spec}", ["sample", *common, "--sampler", spec, "--adjust", str(work / "head"),
                               "--tokens-per-step", "4", *shape, "--batch-size", "8",
                               "--out", str(work / f"{spec.replace(':', '_')}.jsonl")])
    run("eval", ["eval", *common, "--adjust", str(work / "head"), "--samplers", "parallel,adjust",
                 "--tokens-per-step", "1,4", "--num", "16", "--length", "12", "--out", str(work / "eval")])
    if not same:
        raise SystemExit("released_code: samples depend on the batch size")
    if args.family == "rnd1" or (args.family in ("llada", "lladamoe") and args.generate_file is not None):
        own_sampler_agreement(args.family, model, PROMPTS, args.generate_file, head_as_is=args.head_as_is)


if __name__ == "__main__":
    main()
