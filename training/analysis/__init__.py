"""effiseg.training.analysis"""
