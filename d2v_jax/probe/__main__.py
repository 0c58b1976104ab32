from d2v_jax.probe.cli import main

main()
