"""MLflow models-from-code entry point of `mirflow-latent-factor-cnn` (the class lives in lightning_modules/served.py)."""

from mlflow.models import set_model

from lightning_modules.served import LatentFactorPyfunc

set_model(LatentFactorPyfunc())
