"""CAR routing and DeepConf: calibration maths, labelling and reports, routing, built-in tasks, parallel thinking."""
