"""The elastic-EP knobs travel from the command line (AppArgs) into each replica's EPConfig."""
from deploy.app_config import AppArgs
from deploy.model_server import ep_config


def test_elastic_knobs_reach_the_ep_group_config():
    default = ep_config(AppArgs())
    assert (default.elastic, default.replace_lost_ranks, default.probe_timeout_s) == (True, True, 2.0)
    args = AppArgs(elastic_ep=False, replace_lost_ranks=False, probe_timeout_s=5.0, collective_timeout_s=30.0)
    ep = ep_config(args)
    assert (ep.elastic, ep.replace_lost_ranks, ep.probe_timeout_s, ep.collective_timeout_s) == (False, False, 5.0, 30.0)
