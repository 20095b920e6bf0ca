"""`chatforge audit MODEL --canaries FILE`: flags -> tools.audit -> the exposure table, printed."""

from __future__ import annotations


def audit_command(model: str, canaries: str | None = None, data: str | None = None, method: str = "auto",
                  sample_size: int = 5000, prefix_tokens: int = 50, suffix_tokens: int = 50,
                  max_sequences: int = 200, batch_size: int = 256, device: str = "auto", seed: int = 0,
                  out: str | None = None) -> int:
    """Measure what a trained model memorised: exposure and extraction of the canaries planted by
    `chatforge prepare --canaries`, and the verbatim extraction rate on training data.

    Args:
        model: a model folder (a run's final/ or best/), adapter folder or known model name.
        canaries: canaries.json, or the prepared folder holding it (required).
        data: also measure verbatim extraction on this dataset's train split (e.g. the prepared folder).
        method: exposure by exact enumeration (|R| <= 1e6), a skew-normal fit (skewnorm), or auto (exact when it can).
        sample_size: candidates scored for the skew-normal fit.
        prefix_tokens: tokens of a training sequence given to the model.
        suffix_tokens: tokens that must follow verbatim for the sequence to count as extracted.
        max_sequences: training sequences tried (a seeded sample of those long enough).
        batch_size: candidate sequences scored per forward pass.
        device: auto, cpu or cuda.
        seed: seed of the samples.
        out: where audit.json goes (default: the run folder of MODEL, else MODEL itself).
    """
    from chatforge.errors import ChatforgeError
    from chatforge.tools.audit import audit

    if not canaries:
        raise ChatforgeError("audit: pass --canaries FILE (the canaries.json that `chatforge prepare --canaries` wrote)")
    r = audit(model, canaries, data=data, sample_size=sample_size, prefix_tokens=prefix_tokens,
              suffix_tokens=suffix_tokens, max_sequences=max_sequences, batch_size=batch_size, device=device,
              seed=seed, out=out, method=method)
    print(f"{'canary':<12} {'lang':<4} {'repeats':>7} {'exposure':>9} {'of':>6} {'method':<8} {'rank':>8} extracted")
    for c in r["canaries"]:
        rank = f"{c['rank']:,}" if c["rank"] is not None else "-"
        print(f"{c['id']:<12} {c['language']:<4} {c['repeats']:>7} {c['exposure']:>9.2f} {c['max_exposure']:>6.2f} "
              f"{c['method']:<8} {rank:>8} {'yes' if c['extracted'] else 'no'}")
    for reps, g in r["by_repeats"].items():
        print(f"repeated {reps}x: mean exposure {g['mean_exposure']:.2f} bits (max {g['max_exposure']:.2f}), "
              f"{g['extracted']} of {g['canaries']} extracted")
    if "verbatim" in r:
        v = r["verbatim"]
        rate = f"{v['rate']:.1%}" if v["rate"] is not None else "n/a"
        print(f"verbatim extraction ({v['prefix']} tokens -> the next {v['suffix']}): {v['extracted']} of "
              f"{v['sequences']} training sequences ({rate}; {v['eligible']} long enough)")
    if "privacy" in r:
        print(f"trained with differential privacy: epsilon {r['privacy']['epsilon']:.3g}, delta {r['privacy']['delta']:.3g}")
    print(f"wrote {r['path']}")
    return 0
