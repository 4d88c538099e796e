"""The ablation table's seed statistics (``unimlip_train.ablation.stats`` and ``table.config_rows``) against
independent references: t quantiles against SciPy when installed, else published values, and in any case
against a numerical integration of the t density written here; means, sample stds, intervals and paired
differences against naive loops over hand-made seed rows."""
import math
import random

import pytest

from unimlip_train.ablation import stats
from unimlip_train.ablation.table import config_rows, excludes_zero, find_baseline, markdown

# Two-sided 95 % (p = 0.975) quantiles of Student's t, as printed in any statistics table.
T_975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 9: 2.2621572, 29: 2.0452296}


def t_cdf_by_integration(t: float, df: int, steps: int = 200_000) -> float:
    """P(T <= t) for t > 0: 1/2 plus Simpson's rule over the t density from 0 to t."""
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = [const * (1 + (t * i / steps) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    h = t / steps
    return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_a_table_and_the_integrated_density(df):
    q = stats.t_quantile(0.975, df)
    try:
        from scipy.stats import t as scipy_t
    except ImportError:
        assert q == pytest.approx(T_975[df], abs=1e-6)
    else:
        assert q == pytest.approx(scipy_t.ppf(0.975, df), rel=1e-10)
    assert t_cdf_by_integration(q, df) == pytest.approx(0.975, abs=1e-9)
    for p in (0.6, 0.9, 0.995):
        assert t_cdf_by_integration(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-8)


def test_t_quantile_rejects_what_it_cannot_answer():
    for p, df in ((0.5, 3), (1.0, 3), (0.975, 0)):
        with pytest.raises(ValueError, match="t_quantile"):
            stats.t_quantile(p, df)


def naive_summary(values):
    """Mean, sample std and t-interval by loops (the table above for the quantile)."""
    n = len(values)
    total = 0.0
    for v in values:
        total += v
    m = total / n
    if n == 1:
        return m, None, None
    squares = 0.0
    for v in values:
        squares += (v - m) * (v - m)
    s = math.sqrt(squares / (n - 1))
    half = T_975[n - 1] * s / math.sqrt(n)
    return m, s, [m - half, m + half]


def seed_row(config, seed, terms, **metrics):
    return {"config": config, "seed": seed, "status": "ok", "step": 5, "target_steps": 5, "terms": terms,
            "weights": {t: 1.0 for t in terms}, **metrics}


def test_config_rows_against_naive_loops():
    rng = random.Random(0)
    seeds = [0, 1, 2, 3, 4]
    rows = []
    for config, terms, shift in (("clip_only", ["itc"], 0.0), ("all", ["itc", "mlm"], -8.0),
                                 ("fused", ["itc", "itm"], 0.4)):
        for seed in seeds:
            rows.append(seed_row(config, seed, terms, mean_recall=20 + shift + rng.gauss(0, 2),
                                 **{"zeroshot/balanced_accuracy": 80 + shift + rng.gauss(0, 3),
                                    "zeroshot/auroc": 90 + shift / 2 + rng.gauss(0, 1), "num_samples": 270}))
    # One seed of 'fused' failed: its statistics use the four others, its differences the four pairs.
    rows[-1] = {**rows[-1], "status": "failed: training exited with 1", "mean_recall": None}
    baseline = find_baseline(rows, "")
    assert baseline == "clip_only"
    out = {r["config"]: r for r in config_rows(rows, baseline)}
    assert list(out) == ["clip_only", "all", "fused"]
    assert out["fused"]["seeds"] == [0, 1, 2, 3] and out["fused"]["status"] == "4 of 5 seeds ok"
    assert [r["seed"] for r in out["fused"]["runs"]] == seeds  # every run listed, the failed one too
    assert "delta_mean_recall" not in out["clip_only"] and out["clip_only"]["baseline"] == "clip_only"
    for config in out:
        ok = [r for r in rows if r["config"] == config and r["status"] == "ok"]
        for key in ("mean_recall", "zeroshot/balanced_accuracy", "zeroshot/auroc"):
            m, s, ci = naive_summary([r[key] for r in ok])
            assert out[config][key] == pytest.approx(m, abs=1e-12)
            assert out[config][f"{key}_std"] == pytest.approx(s, abs=1e-12)
            assert out[config][f"{key}_ci95"] == pytest.approx(ci, abs=1e-5)
            if config == "clip_only":
                continue
            diffs = []
            for r in ok:
                for b in rows:
                    if b["config"] == "clip_only" and b["seed"] == r["seed"]:
                        diffs.append(r[key] - b[key])
            dm, _, dci = naive_summary(diffs)
            assert out[config][f"delta_{key}"] == pytest.approx(dm, abs=1e-12)
            assert out[config][f"delta_{key}_ci95"] == pytest.approx(dci, abs=1e-5)
        assert out[config]["num_samples"] == 270 and out[config]["num_samples_std"] == 0.0
        assert "delta_num_samples" not in out[config]  # a count: averaged, never compared
    assert excludes_zero(out["all"]["delta_mean_recall_ci95"])  # -8 points against noise of 2 over 5 seeds
    assert not excludes_zero(out["fused"]["delta_mean_recall_ci95"])  # +0.4 against the same noise

    md = markdown(list(out.values()), baseline, ["About."])
    assert "**bold**: the interval excludes 0" in md
    line = next(x for x in md.splitlines() if x.startswith("| all |"))
    d, ci = out["all"]["delta_mean_recall"], out["all"]["delta_mean_recall_ci95"]
    assert f"**Δ {d:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]**" in line
    fused = next(x for x in md.splitlines() if x.startswith("| fused |")).split(" | ")[5]
    assert fused.startswith(f"{out['fused']['mean_recall']:.2f} ± ") and "Δ" in fused and "**" not in fused
    assert "## Per seed" in md and md.count("| fused |") == 1 + 5


def test_one_seed_has_no_spread_and_a_named_baseline_wins():
    rows = [seed_row("a", 3, ["itc", "mlm"], mean_recall=10.0), seed_row("clip_only", 3, ["itc"], mean_recall=12.5),
            seed_row("b", 3, ["itc"], mean_recall=11.0)]
    assert find_baseline(rows, "b") == "b"
    with pytest.raises(ValueError, match="choices: a, clip_only, b"):
        find_baseline(rows, "c")
    assert find_baseline([r for r in rows if r["config"] != "clip_only"], "") == "b"  # the itc-only config
    out = {r["config"]: r for r in config_rows(rows, "clip_only")}
    a = out["a"]
    assert a["mean_recall"] == 10.0 and a["mean_recall_std"] is None and a["mean_recall_ci95"] is None
    assert a["delta_mean_recall"] == -2.5 and a["delta_mean_recall_ci95"] is None and a["paired_seeds"] == [3]
    md = markdown(list(out.values()), "clip_only", [])
    assert "| a | 3 | itc + mlm | 5 | ok | 10.00 Δ -2.50 |" in md
