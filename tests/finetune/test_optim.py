"""finetune.optim.build_optimizer builds the optimizer the plan names (plan["optimizer"])."""
import pytest

from finetune.errors import TrainingError
from finetune.optim import build_optimizer, optimizer_name

torch = pytest.importorskip("torch")


def _params():
    torch.manual_seed(0)
    frozen = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    return [torch.nn.Parameter(torch.randn(8, 4)), frozen]


@pytest.mark.parametrize("name", ["adamw", "adamw_fused"])
def test_adamw_variants_train_only_the_trainable_parameters(name):
    params = _params()
    optimizer = build_optimizer(params, {"optimizer": name, "learning_rate": 0.1}, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.1 and len(optimizer.param_groups[0]["params"]) == 1
    assert bool(optimizer.defaults.get("fused")) == (name == "adamw_fused")
    before = params[0].detach().clone()
    (params[0] ** 2).sum().backward()
    optimizer.step()
    assert (params[0].abs().sum() < before.abs().sum()).item()


def test_default_follows_the_device():
    assert optimizer_name({}, torch.device("cpu")) == "adamw"
    assert optimizer_name({}, "cuda:0") == "adamw_fused"


def test_paged_optimizers_need_a_gpu_and_bitsandbytes():
    with pytest.raises(TrainingError, match="needs a GPU"):
        build_optimizer(_params(), {"optimizer": "paged_adamw_8bit"}, torch.device("cpu"))
    with pytest.raises(TrainingError, match="Unknown optimizer 'sgd'"):
        build_optimizer(_params(), {"optimizer": "sgd"}, torch.device("cpu"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(TrainingError, match="needs the bitsandbytes package"):
            build_optimizer(_params(), {"optimizer": "paged_adamw"}, "cuda")
