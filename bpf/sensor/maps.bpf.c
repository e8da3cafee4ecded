// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The socket layer's maps and globals, defined once for the whole linked object (the
 * other parts see them as externs), and the BTF anchors that make clang emit every
 * shared layout so Python can read it (src/flowtap/loader/btf.py).
 */
#define FT_DEFINE_MAPS
#include "conns.h"
#include "environment.h"
#include "payload.h"
#include "tls.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const struct ft_conn_open_event *anchor_open __attribute__((unused));
const struct ft_conn_close_event *anchor_close __attribute__((unused));
const struct ft_exec_event *anchor_exec __attribute__((unused));
const struct ft_exit_event *anchor_exit __attribute__((unused));
const struct ft_fork_event *anchor_fork __attribute__((unused));
const struct ft_go_executable *anchor_go_executable __attribute__((unused));
const struct ft_go_executable_key *anchor_go_executable_key __attribute__((unused));
const struct ft_data_event *anchor_data __attribute__((unused));
const struct ft_payload_skip *anchor_payload_skip __attribute__((unused));
const struct ft_conn_state *anchor_state __attribute__((unused));
const struct ft_listener *anchor_listener __attribute__((unused));
const struct ft_listener_key *anchor_listener_key __attribute__((unused));
const enum ft_event_kind *anchor_kind __attribute__((unused));
const enum ft_counter *anchor_counter __attribute__((unused));
const enum ft_direction *anchor_direction __attribute__((unused));
const enum ft_flow *anchor_flow __attribute__((unused));
const enum ft_source *anchor_source __attribute__((unused));
const enum ft_strategy *anchor_strategy __attribute__((unused));
const enum ft_feature *anchor_feature __attribute__((unused));
