"""The membership stream processor: policy and endpoint events in, selector memberships out.

Pure cores (`compile`, `membership`, `oracle`, `local`) hold the logic and are tested
without a broker; `app` is the thin Faust adapter that `portcullis process` runs.
"""
