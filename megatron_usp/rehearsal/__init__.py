"""The Megatron-LM rehearsal: a Megatron-LM checkout's own ``pretrain_gpt.py`` (patched by ``patches/``) trains a
tiny GPT on CPU/gloo under torchrun, once without sequence parallelism (the baseline) and once with USP and the same
Megatron flags; every iteration's lm loss must agree. A rehearsal for the GPU run, not a CPU backend.

* :mod:`.launcher` (``python -m megatron_usp.rehearsal SCRIPT ...``): installs the CPU stand-ins
  (:mod:`megatron_usp.megatron.cpu_standins`) and runs the script as ``__main__``; :mod:`.probes` print what ran
  (the USP grid and attention calls, the max attention logit); :mod:`.references` give the baseline the attentions
  Megatron's local one lacks on CPU (THD, multi-latent attention).
* :mod:`.cases`: the table of baseline-vs-USP cases and their flags.
* :mod:`.parse_check` and :mod:`.sft_fixture`: programs the harness runs with the checkout on PYTHONPATH (parse the
  USP flags through Megatron-LM's own argument checks; make the tiny ``--sft`` dataset).

``tools/check_megatron_patch.py MEGATRON_DIR --train`` drives it all. This package's ``__init__`` imports nothing:
``parse_check`` and ``sft_fixture`` put their triton stand-in in place before anything imports Megatron-LM.
"""
