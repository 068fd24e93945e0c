"""Retrofit a model with DMC: a thin wrapper around ``python -m nemo_dmc.train``.

    python examples/retrofit.py                          # tiny demo, all three stages
    python examples/retrofit.py model=smollm2_135m stage=retrofit dmc.target_cr=2
    torchrun --nproc-per-node 2 examples/retrofit.py parallel=tp2

Every Hydra override of ``nemo_dmc.train`` works here (configs in ``conf/``).
"""

from nemo_dmc.train import main

if __name__ == "__main__":
    main()
