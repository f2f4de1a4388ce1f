"""Data tables for the planner: known base models, instance prices, throughput anchors."""
