"""MLflow models-from-code entry point of the pre-trained source models (the class lives in lightning_modules/served.py)."""

from mlflow.models import set_model

from lightning_modules.served import PretrainedEmbeddingPyfunc

set_model(PretrainedEmbeddingPyfunc())
