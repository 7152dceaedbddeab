"""Train paired arms (with/without normalization) as configured by conf/ (Hydra).

    python scripts/train.py experiment=demo
    python scripts/train.py -m model=mlp,cnn model.norm=bn,none seed=0,1,2
"""

from icsk.cli import train_main

if __name__ == "__main__":
    train_main()
