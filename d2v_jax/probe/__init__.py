"""Probes on frozen data2vec features: how much a run's representations hold.

  cli.py       python -m d2v_jax.probe: pretrained (and / or random init) rows on a labelled set
  features.py  the jitted forward to one block's token features, mean-pooled, and their Gram
  fit.py       stratified splits, linear (logistic regression) and k-NN probes
  rank.py      RankMe, the effective rank of a feature matrix

A labelled set comes from the run's modality (data/<m>.py labelled_set, d2v_jax/modality.py).
"""
