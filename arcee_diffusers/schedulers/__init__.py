from .flow_paths import FlowPath, get_flow_path
from .sampling import sample_flow
from .scheduling_gvp_flow import PAPER_SOLVER, FlowMatchGVPScheduler, FlowMatchGVPSchedulerOutput, sample_ode

__all__ = [
    "PAPER_SOLVER",
    "FlowMatchGVPScheduler",
    "FlowMatchGVPSchedulerOutput",
    "FlowPath",
    "get_flow_path",
    "sample_flow",
    "sample_ode",
]
