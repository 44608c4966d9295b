"""DVC stage `evaluate`: reads params.yaml and runs pipeline job 'evaluate' (see dvc.yaml for its outs)."""
from stages._entry import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
