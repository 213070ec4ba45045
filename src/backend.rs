//! Which device runs the model: the GPU backend (`crate::gpu`) or candle on the CPU, behind one
//! type that the app and the CLI use. A GPU that is missing, refuses a device, or fails or is lost
//! mid-run hands over to the CPU with a notice; routing records look the same from either.
