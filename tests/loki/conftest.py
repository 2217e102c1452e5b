import json

import pytest

from tests.tiny_models import random_rows, tiny_model


@pytest.fixture(params=["llama", "qwen2"])
def base_dir(request, tmp_path):
    """A tiny random model saved locally, and its position JSON."""
    model = tiny_model(request.param)
    model.save_pretrained(tmp_path / "base")
    rows = random_rows()
    (tmp_path / "10.json").write_text(json.dumps(rows))
    return tmp_path, model, rows
