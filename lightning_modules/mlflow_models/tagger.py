"""MLflow models-from-code entry point of `mirflow-tagger` (the class lives in lightning_modules/served.py)."""

from mlflow.models import set_model

from lightning_modules.served import TaggerPyfunc

set_model(TaggerPyfunc())
