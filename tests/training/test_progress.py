"""The terminal's lines of a fit: a watcher speaks while a batch takes long, and goes quiet when the fit ends."""

from __future__ import annotations

import threading
import time

import keras
import numpy as np
import pytest

from spinemri.training.fit import ProgressLines


class _Slow(keras.callbacks.Callback):
    """Each batch takes ``seconds``; the batch ``fail_at`` raises instead of ending."""

    def __init__(self, seconds: float, fail_at: int | None = None):
        super().__init__()
        self.seconds, self.fail_at = seconds, fail_at

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)
        if batch == self.fail_at:
            raise RuntimeError("a batch that fails")


def _fit(*callbacks):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((16, 4), np.float32), np.zeros((16, 1), np.float32)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=list(callbacks))


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "progress-lines" and t.is_alive()]


def test_a_long_batch_gets_a_line_and_the_watcher_ends_with_the_fit(capsys):
    _fit(ProgressLines("val_loss", every_s=0.3), _Slow(0.8))
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("  epoch 1/1: batch ")], lines
    assert lines[-1].startswith("epoch 1/1: loss "), lines
    time.sleep(1.5)
    assert not _watchers()


def test_a_fit_that_raises_leaves_no_watcher_speaking(capsys):
    with pytest.raises(RuntimeError, match="a batch that fails"):
        _fit(ProgressLines("val_loss", every_s=0.3), _Slow(0.5, fail_at=1))
    capsys.readouterr()
    time.sleep(2.0)  # a watcher left behind would say "epoch 1/1: batch ..." several times by now
    assert capsys.readouterr().out == "" and not _watchers()
