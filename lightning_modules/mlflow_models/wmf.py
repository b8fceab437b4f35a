"""MLflow models-from-code entry point of `mirflow-wmf` (the class lives in lightning_modules/served.py)."""

from mlflow.models import set_model

from lightning_modules.served import WMFPyfunc

set_model(WMFPyfunc())
