// The HoloV part of vtprune._cpu (holov_cpu.cpp). scope_cpu.cpp defines the module and calls
// register_holov, so the one extension holds both CPU engines.
#pragma once

#include <pybind11/pybind11.h>

namespace vtprune_cpu {

// Adds holov_select_f32, holov_crop_stats_f32 and holov_isas to the module.
void register_holov(pybind11::module_& m);

}  // namespace vtprune_cpu
