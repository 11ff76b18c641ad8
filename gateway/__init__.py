"""fleetflow's MQTT endpoint for devices (`fleetflow mqtt`)."""
