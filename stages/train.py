"""DVC stage `train`: reads params.yaml and runs pipeline job 'train' (see dvc.yaml for its outs)."""
from stages._entry import run_stage

if __name__ == "__main__":
    run_stage("train")
