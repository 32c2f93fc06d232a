"""Inventory + devices + profile -> Plan: memory model, speed model, planner, plan files. Pure: loads nothing."""
