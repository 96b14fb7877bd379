"""paraplan's planner: model -> graph -> search -> Plan (imports the cost model)."""
