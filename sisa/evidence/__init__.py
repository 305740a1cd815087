"""What proves a run forgot: bit-for-bit verification, the erasure check, membership-inference audits with their
attacks and ROC statistics, approximate baselines to compare against, reports and the deletion history."""
