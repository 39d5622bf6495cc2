"""The elastic-EP and rank-placement knobs travel from the command line (AppArgs) into each replica's EPConfig."""
from deploy.app_config import AppArgs
from deploy.model_server import ep_config


def test_elastic_knobs_reach_the_ep_group_config():
    default = ep_config(AppArgs())
    assert (default.elastic, default.replace_lost_ranks, default.probe_timeout_s) == (True, True, 2.0)
    args = AppArgs(elastic_ep=False, replace_lost_ranks=False, probe_timeout_s=5.0, collective_timeout_s=30.0)
    ep = ep_config(args)
    assert (ep.elastic, ep.replace_lost_ranks, ep.probe_timeout_s, ep.collective_timeout_s) == (False, False, 5.0, 30.0)


def test_routing_options_reach_the_rank_placement():
    """--request-router power_of_two: no cache-aware or session placement of requests on ranks either."""
    assert ep_config(AppArgs(enable_prefix_caching=True)).cache_aware_ranks is True
    assert ep_config(AppArgs(enable_prefix_caching=True, request_router="power_of_two")).cache_aware_ranks is False
    assert ep_config(AppArgs(enable_prefix_caching=True, routing_load_bound=3)).routing_load_bound == 3
