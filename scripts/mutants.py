"""One-line mutations of the mechanism code, each run against its tests: every one should be caught (KILLED).

    .venv/bin/python scripts/mutants.py              # all of them (about 3 minutes on one thread)
    .venv/bin/python scripts/mutants.py HRIG DiffFit # those whose name contains one of the words

Each mutant is applied in a temporary git worktree of HEAD (your checkout is never touched), the named test files
run with `pytest -x` (the worktree's efdit first on PYTHONPATH, not the installed one), and the file is restored. A SURVIVED line is a change to that mechanism the suite would miss:
add the test that catches it, then add the mutant here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (name, file, the line's text, its mutation, test files)
MUTANTS = [
 ("guidance: two-term scales swapped", "efdit/diffusion/guidance.py",
  "null + self.scale_super * (sup - null) + self.scale * (cond - sup)", "null + self.scale * (sup - null) + self.scale_super * (cond - sup)", "tests/test_guidance_formulas.py"),
 ("guidance: cfg as cond + s(cond-other)", "efdit/diffusion/guidance.py",
  "return other + self.scale * (cond - other)", "return cond + self.scale * (cond - other)", "tests/test_guidance_formulas.py"),
 ("DiffFit: gamma never applied", "efdit/models/dit.py",
  "return out if gamma is None else out * gamma", "return out", "tests/test_peft_mechanisms.py"),
 ("cache path: gamma dropped on the attention branch", "efdit/models/dit.py",
  "x = x + self.gated(attn, gate_msa, self.gamma_attn)", "x = x + self.gated(attn, gate_msa, None)", "tests/test_accel.py tests/test_peft_mechanisms.py"),
 ("cache: stale gate (gate of the full step stored)", "efdit/models/dit.py",
  'attn = block_cache(index, "attn", lambda x_, c_: self.attn_out(x_, shift_msa, scale_msa, grid), x, c)',
  'attn = block_cache(index, "attn", lambda x_, c_: self.attn_out(x_, shift_msa, scale_msa, grid) * gate_msa.unsqueeze(1), x, c) / gate_msa.unsqueeze(1)',
  "tests/test_accel.py"),
 ("D2iT DCT: i.i.d. noise instead of multi-grained", "efdit/d2it/multigrain.py",
  "return torch.where(upsample_map(grain, 2).bool(), eps_f, eps_c.repeat_interleave(2, 2).repeat_interleave(2, 3))", "return eps_f", "tests/test_d2it_mechanisms.py tests/test_d2it.py"),
 ("D2iT DCT: plain MSE instead of the multi-grained loss", "efdit/d2it/multigrain.py",
  "mse = multigrain_reduce((noise - eps) ** 2, grain, w_coarse, w_fine, weighting)", "mse = ((noise - eps) ** 2).mean()", "tests/test_d2it_mechanisms.py tests/test_d2it.py"),
 ("D2iT RefineNet: residual dropped", "efdit/d2it/dct.py",
  "fine_out = coarse[:, :, None] + delta if self.residual else delta", "fine_out = delta", "tests/test_d2it_mechanisms.py tests/test_d2it.py"),
 ("D2iT DGT: cross-entropy target flipped", "efdit/d2it/dgt.py",
  "return F.cross_entropy(logits, grain)", "return F.cross_entropy(logits, 1 - grain)", "tests/test_d2it_mechanisms.py tests/test_d2it.py"),
 ("D2iT DGT: sign of x0 flipped", "efdit/d2it/dgt.py",
  "x0 = torch.tanh((logits[:, 1:2] - logits[:, 0:1]) / 2)", "x0 = torch.tanh((logits[:, 0:1] - logits[:, 1:2]) / 2)", "tests/test_d2it_mechanisms.py tests/test_d2it.py"),
 ("HRIG: old refiner trained without the blur of D", "efdit/diffusion/hooks/hrig.py",
  "up = enhance_bicubic(degrade(z, lo_size, sigma, down), size=(H, W))", "up = enhance_bicubic(degrade(z, lo_size, 0.0, down), size=(H, W))", "tests/test_hrig.py"),
 ("HRIG: detail refiner without its spectral term", "efdit/diffusion/hooks/hrig.py",
  "loss = F.mse_loss(y, x0) + spectral_weight * ring_loss(y, x0, A, w)", "loss = F.mse_loss(y, x0)", "tests/test_hrig.py"),
 ("HRIG: fusion sign flipped", "efdit/diffusion/hooks/hrig.py",
  "return (x + gain * delta).to(x0.dtype)", "return (x - gain * delta).to(x0.dtype)", "tests/test_hrig.py"),
 ("Tiered Embedder: subclass row not added", "efdit/models/embedders.py",
  "emb = emb + self.sub_table(labels.clamp(0, self.num_sub - 1)) * is_sub", "emb = emb + 0 * self.sub_table(labels.clamp(0, self.num_sub - 1)) * is_sub", "tests/test_tiered_peft.py"),
 ("train: label lr scale ignored", "efdit/engine/train.py",
  'g["lr"] = lr * g.get("lr_scale", 1.0)', 'g["lr"] = lr', "tests/test_train.py"),
 ("ProAttention proxy: broadcast keys = Q_p always", "efdit/models/proattention.py",
  'b_p = pool_tokens(k, grid, pool) if broadcast_keys == "k" else q_p', 'b_p = q_p', "tests/test_proattention.py"),
 ("ProAttention proxy: second stage attends to V instead of the proxies", "efdit/models/proattention.py",
  "return F.scaled_dot_product_attention(q, b_p, proxies).to(dtype)", "return F.scaled_dot_product_attention(q, b_p, pool_tokens(v, grid, pool)).to(dtype)", "tests/test_proattention.py"),
 ("ProAttention kv: values not pooled", "efdit/models/proattention.py",
  "return F.scaled_dot_product_attention(q, pool_tokens(k, grid, pool), pool_tokens(v, grid, pool)).to(dtype)",
  "return F.scaled_dot_product_attention(q, pool_tokens(k, grid, pool), pool_tokens(k, grid, pool)).to(dtype)", "tests/test_proattention.py"),
 ("min-SNR: eps weight min(SNR,g) instead of /SNR", "efdit/diffusion/timesteps.py",
  "        return clipped / snr\n", "        return clipped\n", "tests/test_timesteps.py"),
 ("min-SNR: v weight /SNR", "efdit/diffusion/timesteps.py",
  "return clipped / (snr + 1)", "return clipped / snr", "tests/test_timesteps.py"),
 ("Delta-DiT: stages swapped", "efdit/diffusion/hooks/cache.py",
  'return "rear" if self.t is not None and self.t >= self.boundary else "front"', 'return "front" if self.t is not None and self.t >= self.boundary else "rear"', "tests/test_accel.py"),
 ("TaylorSeer: first-order term without k", "efdit/diffusion/hooks/cache.py",
  "pred = pred + factors[j] * (k ** j / math.factorial(j))", "pred = pred + factors[j] / math.factorial(j)", "tests/test_accel.py"),
 ("HRIG band: upper SNR bound ×10 and inclusive", "efdit/diffusion/hooks/hrig.py",
  "idx = torch.nonzero((snr >= snr_band[0]) & (snr < snr_band[1])).flatten()", "idx = torch.nonzero((snr >= snr_band[0]) & (snr <= snr_band[1] * 10)).flatten()", "tests/test_hrig.py"),
 ("Tiered Embedder: superclass row dropped", "efdit/models/embedders.py",
  "emb = self.super_table(self._super_id(labels))  ", "emb = 0 * self.super_table(self._super_id(labels))  ", "tests/test_tiered_peft.py"),
]


def main() -> int:
    only = sys.argv[1:]
    chosen = [m for m in MUTANTS if not only or any(o in m[0] for o in only)]
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(work), "HEAD"], cwd=REPO, check=True)
        try:
            if (REPO / "data").exists() and not (work / "data").exists():
                (work / "data").symlink_to(REPO / "data")
            for name, rel, old, new, tests in chosen:
                path = work / rel
                src = path.read_text()
                if src.count(old) != 1:
                    print(f"STALE    {name}: the line is not in {rel} exactly once; update the mutant")
                    survived += 1
                    continue
                path.write_text(src.replace(old, new))
                t0 = time.time()
                r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests.split()],
                                   cwd=work, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                         "PYTHONPATH": str(work)})
                path.write_text(src)
                failed = next((line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith("FAILED")), "")
                survived += r.returncode == 0
                print(f"{'KILLED  ' if r.returncode else 'SURVIVED'} {name} ({time.time() - t0:.0f} s) {failed}",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(work)], cwd=REPO, check=False)
    print(f"{len(chosen) - survived} of {len(chosen)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
