"""The Redis-facing suite, on every topology: the quota store's and the cache's tests through
the topology's client and the request-path pipeliner, and the admin API on two gateways."""

from __future__ import annotations

from tests.backends.test_redis_cache import (
    test_a_scope_never_reads_another_scopes_entry,
    test_a_stored_response_is_served_fresh_then_stale,
    test_an_entry_is_checked_against_its_full_scope,
    test_an_undecodable_entry_is_a_miss,
    test_oversized_responses_are_not_stored,
)
from tests.backends.test_redis_quota import (
    test_a_counter_written_under_another_period_reads_as_absent,
    test_a_request_given_back_is_as_if_never_taken,
    test_both_or_neither,
    test_concurrent_takes_never_over_admit,
    test_credits_are_spent_only_when_the_base_quota_refuses,
    test_redis_time_path_agrees_with_a_gcra_at_the_times_redis_used,
    test_settle_of_a_credit_paid_request_goes_to_the_balance,
    test_settle_refunds_and_takes_the_excess_without_refusing,
    test_the_most_a_window_holds_is_the_documented_bound,
)
from tests.service.test_admin import (
    replicas,
    test_an_upgrade_lifts_the_quota_until_it_expires,
    test_burst_credits_are_spent_when_the_quota_is_out,
    test_gains_change_live_on_every_replica,
    test_keys_are_created_once_and_revoked_on_every_replica,
)

__all__ = [
    "replicas",
    "test_a_counter_written_under_another_period_reads_as_absent",
    "test_a_request_given_back_is_as_if_never_taken",
    "test_a_scope_never_reads_another_scopes_entry",
    "test_a_stored_response_is_served_fresh_then_stale",
    "test_an_entry_is_checked_against_its_full_scope",
    "test_an_undecodable_entry_is_a_miss",
    "test_an_upgrade_lifts_the_quota_until_it_expires",
    "test_both_or_neither",
    "test_burst_credits_are_spent_when_the_quota_is_out",
    "test_concurrent_takes_never_over_admit",
    "test_credits_are_spent_only_when_the_base_quota_refuses",
    "test_gains_change_live_on_every_replica",
    "test_keys_are_created_once_and_revoked_on_every_replica",
    "test_oversized_responses_are_not_stored",
    "test_redis_time_path_agrees_with_a_gcra_at_the_times_redis_used",
    "test_settle_of_a_credit_paid_request_goes_to_the_balance",
    "test_settle_refunds_and_takes_the_excess_without_refusing",
    "test_the_most_a_window_holds_is_the_documented_bound",
]
