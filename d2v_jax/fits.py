"""Recipes that fit a TPU slice: `fit=<topology>` in every config
(`--config configs/text.py:variant=base,v2,fit=v5e-8`) sets the mesh, remat policy, compute
dtype and global batch with which that recipe's train step fits the slice's HBM.

The choices come from real ahead-of-time compiles (`python -m d2v_jax.compile --table
docs/scale.md --fits`, docs/scale.md "Recipes that fit"): the recipe's own global batch with
no remat if that fits, else with full remat; where not even full remat fits it, the largest
batch per device that does under full remat, and the batch-size rule (d2v_jax/scaling.py)
scales the recipe's lr, EMA decays and lengths to that batch. A choice the table has not
measured is refused with the list of those it has.
"""

from __future__ import annotations

from d2v_jax.topology import parse_topology

# (modality, variant, objective, topology) -> (remat, examples per device). Mesh: fsdp over
# every device of the slice (data 1), bfloat16 compute. Written from the kind="fit" rows of
# docs/scale.jsonl (tests/test_fits.py checks that they agree).
FITS: dict[tuple[str, str, str, str], tuple[str, int]] = {
    ("text", "base", "v2", "v5e-8"): ("full", 8),
    ("text", "base", "v2", "v5p-8"): ("none", 16),
    ("vision", "base", "v2", "v5e-8"): ("full", 32),
    ("vision", "base", "v2", "v5p-8"): ("none", 64),
}


def key(modality: str, variant: str, v2: bool, topology: str) -> tuple[str, str, str, str]:
  return (modality, variant, "v2" if v2 else "v1", topology)


def apply(c, args: dict) -> None:
  """Sets mesh / remat / dtype / batch of config `c` from FITS for args["fit"] (no-op when
  empty). Runs after the recipe set its reference batch (recipe.finish)."""
  topology = args.get("fit") or ""
  if not topology:
    return
  k = key(c.modality, args["variant"], args["v2"], topology)
  if args["runlocal"] or k not in FITS:
    have = sorted(f"{m}:variant={v}{',v2' if o == 'v2' else ''},fit={t}" for m, v, o, t in FITS
                  if m == c.modality)
    raise ValueError(f"fit={topology}: no measured choice for {c.modality} variant="
                     f"{args['variant']}{',runlocal' if args['runlocal'] else ''}"
                     f"{',v2' if args['v2'] else ''}; measured: {', '.join(have) or 'none'} "
                     "(docs/scale.md; python -m d2v_jax.compile --search_batch for others)")
  remat, per_device = FITS[k]
  devices = parse_topology(topology).num_devices
  c.mesh.preset = "fsdp"
  c.model.encoder.remat = remat
  c.dtype = "bfloat16"
  c.batch_size = per_device * devices
  c.scaling.apply = True     # a batch below the recipe's scales lr, EMA and lengths
