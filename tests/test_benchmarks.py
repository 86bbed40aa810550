"""The speed benchmark's contract: one command, every row measured in one run, JSON with fixed fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_on_a_random_preset_writes_the_contract(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--preset", "tiny", "--length", "16",
                           "--batch-size", "2", "--repeats", "1", "--tokens-per-step", "2,4", "--threads", "1",
                           "--compare-full-head", "--compare-anywhere", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["sampler"], r["k"]) for r in rows] == [
        ("sequential", 1), ("parallel", 2), ("adjust", 2), ("adjust-every-position", 2), ("adjust-anywhere", 2),
        ("parallel", 4), ("adjust", 4), ("adjust-every-position", 4), ("adjust-anywhere", 4)]
    assert set(result["head_pass_ms_by_sampler"]) == {"adjust", "adjust-every-position"}
    for r in rows:
        assert {"ms_per_seq", "base_passes", "head_passes", "floor_vs_naive", "overhead_share"} <= r.keys()
        assert r["ms_per_seq"] > 0 and 0 <= r["overhead_share"] < 1
    for name in ("adjust", "adjust-every-position", "adjust-anywhere"):
        adjust4 = next(r for r in rows if r["sampler"] == name and r["k"] == 4)
        assert adjust4["base_passes"] == 4 and adjust4["head_passes"] == 12 and adjust4["floor_vs_naive"] > 1


def test_kv_cache_benchmark_counts_only_the_generated_tokens_after_a_prompt(tmp_path):
    out = tmp_path / "kv.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kv_cache.py"), "--preset", "tiny", "--length", "16",
           "--block-length", "4", "--prompt-tokens", "8", "--samplers", "sequential:1,parallel:2", "--threads", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["cache"]) for r in rows] == [(s, c) for s in ("sequential", "parallel")
                                                          for c in ("none", "prefix", "dual")]
    assert all(r["base_passes"] == (16 if r["sampler"] == "sequential" else 8) for r in rows)
    bad = subprocess.run(cmd[:2] + ["--prompt-tokens", "6", "--block-length", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of --block-length" in bad.stderr


def test_fixed_shape_head_passes_give_the_samples_of_the_step_before(tmp_path):
    """exact_speedups.py part 2: the ADJUST sampler and the step as it was before its fixed-shape passes (kept in
    the benchmark as the reference) write the same tokens, fixed K and adaptive, with a `--shapes` spec parsed."""
    out = tmp_path / "passes.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "exact_speedups.py"), "--only", "passes",
                           "--shapes", "tiny:20:3:4+adjust:gamma=1/6+adjust:threshold=0.5/3"
                           # a tau at which the random tiny base's draws (4,096 ids) are refused about half the time
                           "+adjust:threshold=0.3:tau=0.00025/6", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["passes"]
    assert [(r["sampler"], r["k"]) for r in rows] == [("adjust", 4), ("adjust:gamma=1", 6), ("adjust:threshold=0.5", 3),
                                                      ("adjust:threshold=0.3:tau=0.00025", 6)]
    assert all(r["same_tokens"] and r["general_ms_per_seq"] > 0 and r["fixed_ms_per_seq"] > 0 for r in rows)


def test_pareto_picks_the_best_row_within_a_budget_in_the_metrics_direction():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pareto
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(sampler, passes, **quality):
        return {"sampler": sampler, "tokens_per_step": None, "speed": {"base_passes_per_sample": passes},
                "quality": {k: {"value": v, "low": v, "high": v} for k, v in quality.items()}}

    rows = [row("sequential", 20, validity=0.9, nll=1.0), row("parallel", 4, validity=0.2, nll=3.0),
            row("threshold:tau=0.9", 6, validity=0.8, nll=1.5), row("adjust", 4, validity=0.85, nll=1.2),
            row("adjust:tau=0.9", 3, validity=0.7, nll=2.0)]
    assert pareto.best_within(rows, 5, adjust=False)["sampler"] == "parallel"
    assert pareto.best_within(rows, 6, adjust=False)["sampler"] == "threshold:tau=0.9"
    assert pareto.best_within(rows, 4, adjust=True, metric="nll")["sampler"] == "adjust"
    assert pareto.best_within(rows, 3, adjust=True, metric="nll")["sampler"] == "adjust:tau=0.9"
    assert pareto.best_within(rows, 2, adjust=True) is None and pareto.describe(None) == "–"
    assert "1.200" in pareto.describe(rows[3], "nll")
    # Beside the metric, what it cannot see: the entropy and MAUVE of an NLL, the total variation of a validity.
    seen = row("threshold:tau=0.5", 5, validity=0.99, tv_distance=0.9, nll=1.0, entropy=2.0, mauve=0.93)
    assert pareto.describe(seen, "validity").startswith("threshold:tau=0.5: 0.990 [0.990, 0.990] (tv 0.90) at 5.0")
    assert "(entropy 2.00, mauve 0.93)" in pareto.describe(seen, "nll")


def test_pareto_reports_by_mauve_what_an_nll_below_k1_hides(capsys):
    """A sampler whose text is less varied than K=1's scores below K=1's NLL: by NLL it is the best row, by MAUVE
    against K=1's samples it is not (the script reports both when it has a scorer)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pareto
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(sampler, passes, nll, mauve):
        quality = {"nll": nll, "mauve": mauve, "entropy": 2.0}
        return {"sampler": sampler, "tokens_per_step": None,
                "speed": {"base_passes_per_sample": passes, "wall_time_s": passes, "samples": 1},
                "quality": {k: {"value": v, "low": v - 0.01, "high": v + 0.01} for k, v in quality.items()}}

    rows = [row("sequential", 20, 7.2, 0.96), row("threshold:tau=0.5", 13, 6.6, 0.90),
            row("adjust:threshold=0.9", 1, 7.1, 0.95)]
    pareto.report(rows, "nll", "13", "english")
    by_nll = capsys.readouterr().out
    assert "by nll, in passes (point estimates): 1 not matched" in by_nll
    assert "| 13 | threshold:tau=0.5: 6.600" in by_nll
    pareto.report(rows, "mauve", "13", "english")
    by_mauve = capsys.readouterr().out
    assert "by mauve, in passes (point estimates): each is matched or beaten." in by_mauve
    assert "by mauve, in wall time (point estimates): each is matched or beaten." in by_mauve


def test_pareto_names_the_training_free_rows_adaptive_adjust_does_not_match():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pareto
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(sampler, passes, seconds, validity):
        return {"sampler": sampler, "tokens_per_step": None,
                "speed": {"base_passes_per_sample": passes, "wall_time_s": seconds, "samples": 10},
                "quality": {"validity": {"value": validity, "low": validity, "high": validity}}}

    rows = [row("sequential", 20, 9.0, 0.9), row("parallel", 2, 1.0, 0.2), row("threshold:tau=0.5", 3, 2.0, 0.8),
            row("adjust", 1, 0.5, 0.99), row("adjust:gamma=4", 3, 3.0, 0.85)]
    # Fixed-K adjust is cheaper and better than everything but is not adaptive; gamma=4 beats the threshold in
    # passes, not in time, and nothing adaptive is as cheap as naive parallel in either.
    missed = pareto.unmatched(rows, "validity", "passes")
    assert [(r["sampler"], best) for r, best in missed] == [("parallel", None)]
    missed = pareto.unmatched(rows, "validity", "wall time")
    assert [(r["sampler"], best) for r, best in missed] == [("parallel", None), ("threshold:tau=0.5", None)]
    # A row that writes no valid string leaves nothing to match, however fast it is.
    rows.append(row("eb:gamma=16", 1, 0.1, 0.0))
    missed = pareto.unmatched(rows, "validity", "wall time")
    assert [r["sampler"] for r, _ in missed] == ["parallel", "threshold:tau=0.5"]
    rows.pop()
    rows[1]["speed"]["base_passes_per_sample"] = 4
    assert pareto.unmatched(rows, "validity", "passes") == []
    rows[1]["quality"]["validity"] = {"value": 0.86, "low": 0.855, "high": 0.87}
    row, best = pareto.unmatched(rows, "validity", "passes")[0]
    assert best["sampler"] == "adjust:gamma=4" and not pareto.overlaps(row, best, "validity")
    best["quality"]["validity"]["high"] = 0.9
    assert pareto.overlaps(row, best, "validity")


def test_heldout_signal_rank_correlation_handles_order_and_ties():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import heldout_signal
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    # ties share their mean rank: x ranks (2.5, 0, 2.5, 1) against (0, 1, 2, 3) -> -1 / sqrt(4.5 * 5)
    assert abs(heldout_signal.spearman([0.3, 0.1, 0.3, 0.2], [1, 2, 3, 4]) + 1 / 22.5 ** 0.5) < 1e-12
    assert heldout_signal.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert heldout_signal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert heldout_signal.spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert abs(heldout_signal.spearman([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12


def test_random_bases_of_any_vocabulary_and_bfloat16_sample_and_fingerprint():
    """speed.py's Dream-7B shape, in miniature: a vocabulary no BPE reaches (an ids-only tokenizer), fewer layers,
    bfloat16 weights; ADJUST samples with it and a bfloat16 base has a fingerprint (numpy has no bfloat16)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import live_head, random_base

    from jointdlm.models.mdlm import weights_fingerprint
    from jointdlm.sampling.loop import SamplingConfig, generate
    from jointdlm.sampling.registry import make_sampler

    base = random_base("tiny", 8, "cpu", vocab_size=5000, layers=1, dtype=torch.bfloat16)
    assert base.net.config.n_layers == 1 and base.spec.vocab_size == 5000
    assert next(base.net.parameters()).dtype == torch.bfloat16
    head = live_head(base)
    assert next(head.parameters()).dtype == torch.bfloat16
    gen = generate(base, make_sampler("adjust", head=head), SamplingConfig(length=8, tokens_per_step=4), num=2)
    assert gen.counters.base_passes == 2 and all(len(t) == 8 for t in gen.tokens)
    state = base.net.state_dict()
    assert weights_fingerprint({}, state) != weights_fingerprint({}, {k: v.float() for k, v in state.items()})


def test_binding_errors_names_each_broken_constraint():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from binding_errors import broken
    finally:
        sys.path.pop(0)
    good = "let kappa be one and gamma be four ; then kappa plus gamma equals kappa plus gamma , not alpha ."
    assert broken(good) == "valid"
    assert broken(good.replace("not alpha", "not kappa")) == "c in {a,b}"
    assert broken(good.replace("equals kappa plus gamma", "equals kappa plus delta")) == "b copy"
    assert broken(good.replace("let kappa", "let gamma").replace("then kappa", "then gamma").replace(
        "equals kappa", "equals gamma")) == "a==b"
    assert broken(good.replace("then kappa", "then rho").replace("not alpha", "not gamma")) == "a copy+c in {a,b}"
    assert broken(good.replace("be one", "be rho")) == "wrong word class"
    assert broken(good[:-2]) == "length"


def test_user_corpus_checker_accepts_exactly_the_balanced_words():
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from user_corpus import dyck_word, is_valid
    finally:
        sys.path.pop(0)
    rng = random.Random(3)
    words = {dyck_word(rng, 6) for _ in range(2000)}
    assert len(words) > 500 and all(is_valid(w, 6) and len(w.split()) == 12 for w in words)
    for bad in ("( [ ) ] ( ) ( ) ( ) ( )", "( ( ( ( ( ( ) ) ) ) ) ]", ") ( ( ) ( ) ( ) ( ) ( )", "( ) ( ) ( ) ( ) ( )",
                "( ) ( ) ( ) ( ) ( ) ( ) ( )", "( ) ( ) ( ) ( ) ( ) ( ("):
        assert not is_valid(bad, 6), bad


def test_user_corpus_permutation_checker(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from user_corpus import is_permutation, write_permutation_corpus
    finally:
        sys.path.pop(0)
    corpus = tmp_path / "perm.txt"
    write_permutation_corpus(corpus, 10, docs=500)
    lines = corpus.read_text().splitlines()
    assert len(lines) == 500 and len(set(lines)) > 450 and all(is_permutation(line, 10) for line in lines)
    good = lines[0].split()
    for bad in (good[:-2], good + [",", good[0]], [good[2]] + good[1:], [w if w != "," else ";" for w in good]):
        assert not is_permutation(" ".join(bad), 10), bad
    assert not is_permutation(lines[0], 9) and not is_permutation("", 10)


def test_user_corpus_chain_checker(tmp_path):
    """Every document of the chain corpus passes; a pair no rule joins, a word off the list, a wrong length fail."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from user_corpus import CHAIN_NEXT, is_chain, write_chain_corpus
    finally:
        sys.path.pop(0)
    assert all(len(set(nxt)) == 2 for nxt in CHAIN_NEXT.values())
    assert sorted(w for nxt in CHAIN_NEXT.values() for w in nxt) == sorted(list(CHAIN_NEXT) * 2)  # two in, two out
    corpus = tmp_path / "chain.txt"
    write_chain_corpus(corpus, 12, docs=500)
    lines = corpus.read_text().splitlines()
    assert len(lines) == 500 and len(set(lines)) > 450 and all(is_chain(line, 12) for line in lines)
    words = lines[0].split()
    stray = next(w for w in CHAIN_NEXT if w not in CHAIN_NEXT[words[0]])
    for bad in (words[:-2], words + [",", CHAIN_NEXT[words[-1]][0]], words[:2] + [stray] + words[3:],
                ["emu"] + words[1:], [w if w != "," else ";" for w in words]):
        assert not is_chain(" ".join(bad), 12), bad
    assert is_chain("ant , bee , cat , fox , lynx , lynx , kiwi", 7) and not is_chain("ant , cat", 2)
    assert not is_chain(lines[0], 11) and not is_chain("", 12)


def test_user_corpus_scores_every_row_with_the_corpus_checker(tmp_path, monkeypatch):
    """Every sampler's samples are judged by the same checker at the corpus's size (a loop variable once
    shadowed the size, and every row after the first read 0.000)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import user_corpus
    finally:
        sys.path.pop(0)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"pretrain": {"seed": 0}}))
    (tmp_path / "model" / "training_done.json").write_text("{}")
    (tmp_path / "trajectories").mkdir()
    (tmp_path / "trajectories" / "manifest.json").write_text("{}")
    for i in range(16):
        (tmp_path / "trajectories" / f"shard-{i:05d}.safetensors").write_text("")
    (tmp_path / "head-seed0").mkdir()
    (tmp_path / "head-seed0" / "adjust_verdict.json").write_text("{}")

    def fake_cli(argv: list[str]) -> str:  # naive parallel writes an unbalanced word, every other sampler a good one
        text = "( [ ) ] ( ) ( ) ( ) ( )" if argv[argv.index("--sampler") + 1] == "parallel" else \
            "( [ ] ) ( ) ( ) ( ) ( )"
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps({"text": text}) + "\n")
        return "NFE 4.0/4.0"

    monkeypatch.setattr(user_corpus, "run", fake_cli)
    monkeypatch.setattr(sys, "argv", ["user_corpus.py", "--workdir", str(tmp_path), "--num", "1"])
    user_corpus.main()
    rows = json.loads((tmp_path / "validity-seed0.json").read_text())
    assert len(rows) == len(user_corpus.ROWS) == 18 and all(r["base_passes"] == 4.0 for r in rows)
    assert [r["valid"] for r in rows] == [0.0 if r["sampler"] == "parallel" else 1.0 for r in rows]


def test_user_corpus_refuses_a_base_of_another_seed(tmp_path):
    """A second pre-training seed needs its own workdir: samples of the first base must not be scored as the
    second's."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "jointdlm-mdlm", "pretrain": {"seed": 0}}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "user_corpus.py"), "--workdir", str(tmp_path),
                           "--kind", "permutation", "--base-seed", "1", "--docs", "50"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pre-trained with seed 0, not --base-seed 1" in proc.stderr, proc.stderr
    assert not (model / "training_done.json").exists() and not (tmp_path / "corpus.txt").exists()


def test_template_errors_sorts_invalid_samples_by_what_broke_them():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from template_errors import error_kind
    finally:
        sys.path.pop(0)
    from jointdlm.data.toy import TEMPLATE_FRAME, get_language

    language = get_language("template")
    owner = {w: s.word for s in language.subjects for w in (s.word, s.home, *(w for p in s.slots for w in p))}
    frame = TEMPLATE_FRAME.split()
    good = language.sample(1, seed=0)[0]
    subject = next(s for s in language.subjects if f" {s.word} " in good)
    other = next(s for s in language.subjects if s is not subject)
    assert error_kind(good, owner, frame) is None
    assert error_kind(good.replace(f" {subject.home} ", f" {other.home} "), owner, frame) == "mix1"
    words = good.split()
    swapped = " ".join(words[:1] + [words[4]] + words[2:4] + [words[1]] + words[5:])  # adj1 <-> adv1 of one subject
    assert error_kind(swapped, owner, frame) == "mix0"
    assert error_kind(good.replace(" in its ", " on its "), owner, frame) == "frame"
    assert error_kind(good.replace(f" {subject.home} ", " zebra "), owner, frame) == "nonword"
    assert error_kind(good[:-2], owner, frame) == "length"


def test_head_precision_base_passes_make_adjust_the_k1_sampler(tiny_model):
    """With every head pass replaced by a base pass on the same canvas and the head free to choose any position,
    greedy ADJUST at K=4 is greedy K=1 token for token: the `base` mode measures the sampler with exact
    distributions. Its head passes still count, and leaving the block restores the head."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from head_precision import ReplacedPasses
    finally:
        sys.path.pop(0)
    import torch

    from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig, StepPasses
    from jointdlm.sampling.base import TokenChoice
    from jointdlm.sampling.loop import SamplingConfig, generate
    from jointdlm.sampling.registry import make_sampler

    head = AdjustHead(AdjustHeadConfig.for_base(tiny_model)).eval()
    torch.nn.init.normal_(head.out_norm.weight)  # a head that changes the distributions
    length, greedy = 16, TokenChoice("confidence", temperature=0.0)
    k1 = generate(tiny_model, make_sampler("sequential"),
                  SamplingConfig(length=length, tokens_per_step=1, seed=3, batch_size=4, choice=greedy,
                                 stop_at_text_end=False), num=4)  # whole canvases: every token compared
    adjust = make_sampler("adjust", head=head, candidates=length)
    config = SamplingConfig(length=length, tokens_per_step=4, seed=3, batch_size=4, choice=greedy,
                            stop_at_text_end=False)
    original = StepPasses.logits
    with torch.no_grad():
        with ReplacedPasses("base", tiny_model):
            exact = generate(tiny_model, adjust, config, num=4)
        assert StepPasses.logits is original
        own = generate(tiny_model, adjust, config, num=4)
    assert exact.tokens == k1.tokens
    assert own.tokens != k1.tokens  # the test's head does move the samples
    assert exact.counters.extra_passes == own.counters.extra_passes > 0


def test_step_profile_counts_each_pass_once_and_every_second(tiny_model):
    """The profile's buckets: one base pass per step and one head pass per head token (calls per batch), nothing
    counted twice (the parts never exceed the run), and a naive run has no head passes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from step_profile import PARTS, profile
    finally:
        sys.path.pop(0)
    from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig

    head = AdjustHead(AdjustHeadConfig.for_base(tiny_model)).eval()
    length, num, batch = 12, 8, 4
    adjust = profile(tiny_model, "adjust", 4, head, length, num, batch)
    steps = length // 4 * (num // batch)  # profiled batches x steps per batch
    assert adjust["base passes calls"] == steps
    assert adjust["head passes calls"] == 3 * steps
    assert adjust["head passes per sample"] == 3 * length // 4
    assert 0 < adjust["of which the output layer"] < adjust["head passes"]
    assert adjust["the rest"] >= 0 and all(adjust[name] >= 0 for name in PARTS)
    naive = profile(tiny_model, "parallel", 4, None, length, num, batch)
    assert naive["head passes calls"] == 0 and naive["base passes calls"] == steps and naive["the rest"] >= 0


def test_pareto_refuses_a_bad_grid_in_one_line(tiny_model, tiny_model_dir, tmp_path):
    """`--tokens-per-step` and `--more-samplers` are user input: a bad value is one line on stderr, before anything
    is sampled or written (an unknown option only once the head it needs is loaded)."""
    from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig

    AdjustHead(AdjustHeadConfig.for_base(tiny_model)).save_pretrained(tmp_path / "head")
    script = [sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--model", str(tiny_model_dir), "--adjust",
              str(tmp_path / "head"), "--language", "template", "--out", str(tmp_path / "out")]
    for extra, message in ((["--tokens-per-step", "1,a"], "--tokens-per-step must be comma-separated integers"),
                           (["--more-samplers", "adjust:bogus=1"], "bad options for the adjust sampler")):
        proc = subprocess.run(script + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_sampler_time_flags_runs_that_spread():
    """sampler_time.py warns when a sampler's middle half of runs spans more than UNSTEADY of its median: steady
    runs of this machine (the §5 English corner) pass, a run spread like the one §6 had to drop does not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sampler_time import UNSTEADY, quartile_spread
    finally:
        sys.path.pop(0)
    steady = [0.57, 0.48, 0.50, 0.48, 0.50, 0.48, 0.51, 0.50, 0.54]
    unsteady = [1.56, 2.10, 1.70, 2.65, 1.82, 2.40, 1.60]
    assert quartile_spread(steady) < UNSTEADY < quartile_spread(unsteady)
    assert quartile_spread([1.0, 2.0, 3.0]) is None and quartile_spread([1.0] * 4) == 0


def test_vocabulary_work_gives_the_tokens_of_the_forms_before():
    """exact_speedups.py part 5: draws in chunks, head passes scored from logits and in-place log-probabilities
    write the tokens the forms before them (kept in the script as references) wrote, naive and ADJUST alike."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from exact_speedups import vocabulary_rows
    finally:
        sys.path.pop(0)
    from jointdlm.sampling import rules

    draw, top_probability, model_logprobs = rules.draw, rules.top_probability, rules.model_logprobs
    rows = vocabulary_rows(1, None, None, preset="tiny", num=3)
    assert [(r["sampler"], r["k"]) for r in rows] == [("parallel", 16), ("parallel", 48), ("adjust:threshold=0.9", 48),
                                                     ("adjust", 48)]
    assert all(r["same_tokens"] for r in rows)
    assert (rules.draw, rules.top_probability, rules.model_logprobs) == (draw, top_probability, model_logprobs)


def test_adjust_recipe_refuses_a_cached_base_of_other_flags(tmp_path):
    """A workdir's cached base was reused whatever --preset / --pretrain-steps said, and its results labelled with
    the new flags (a 2,000-step base reported as a 6,000-step one)."""
    model = tmp_path / "choice" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "jointdlm-mdlm", "pretrain": {
        "preset": "small", "max_steps": 2000, "batch_size": 64}}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adjust_recipe.py"), "--language", "choice",
                           "--workdir", str(tmp_path), "--pretrain-steps", "6000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "max_steps=2000 there, 6000 now" in proc.stderr, proc.stderr


def test_draw_speed_checks_both_draws_against_the_exact_distribution(tiny_model_dir):
    """benchmarks/draw_speed.py: Gumbel-max and inverse-CDF draws both land near the exact distribution at every
    setting, and the timing part runs every sampler with either draw and restores the live one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from draw_speed import distribution_rows, generation_rows
    finally:
        sys.path.pop(0)
    from jointdlm.sampling import rules

    rows = distribution_rows(n=20_000)
    assert len(rows) == 4 and all(r["gumbel_tv"] < 0.02 and r["inverse_cdf_tv"] < 0.02 for r in rows)
    live = rules.draw
    timed = generation_rows(str(tiny_model_dir), None, "parallel:4,sequential:1", num=4, rounds=1)
    assert [r["sampler"] for r in timed] == ["parallel:4", "sequential:1"] and all(r["speed_up"] > 0 for r in timed)
    assert rules.draw is live


def test_pad_before_eos_counts_rows_whose_pad_comes_first():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from pad_before_eos import pad_before_eos
    finally:
        sys.path.pop(0)
    rows = [[5, 0, 6, 2, 0], [5, 6, 2, 0, 0], [5, 0, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert pad_before_eos(rows, pad_id=0, eos_id=2) == 2


def test_words_after_end_counts_rows_with_a_word_past_their_first_stop():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from pad_before_eos import words_after_end
    finally:
        sys.path.pop(0)
    rows = [[5, 0, 6, 2, 0], [5, 6, 2, 0, 0], [5, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 6, 2, 0, 7]]
    assert words_after_end(rows, stops=(0, 2)) == (2, (1 + 2 + 1 + 5 + 2) / 5)
