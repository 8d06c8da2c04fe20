"""Tensor parallelism within an instance: the torch.distributed group (`group`), the sharded
layers (`parallel`) and which KV heads live on which TP rank (`kv_layout`)."""
from mmhpc.distributed.group import TPGroup, get_tp, init_tp_group, set_tp

__all__ = ["TPGroup", "get_tp", "init_tp_group", "set_tp"]
