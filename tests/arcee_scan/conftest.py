import pytest
import scan_testing


@pytest.fixture
def scan_inputs():
    """``scan_testing.make_inputs``: realistic random scan inputs as a ``selective_scan`` keyword dict."""
    return scan_testing.make_inputs


@pytest.fixture
def scan_outputs_and_grads():
    """``scan_testing.outputs_and_grads``: outputs and input gradients of one backend."""
    return scan_testing.outputs_and_grads
